//! Retention, garbage collection and metrics, end to end: real `kiln up` workers on a private
//! `nats-server`, real builds of recipes/minimal.yaml booted under QEMU, `kiln gc` collecting
//! while they run, the cache measured by walking its files here, and `/metrics` checked by
//! Prometheus's own `promtool check metrics`.

use kiln::bus::PrivateServer;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

mod common;
use common::metrics::{checked_metrics, sample};
use common::{Running, disk_usage, free_port, json_lines, kiln, seeded_home, sha256};

fn show(o: &Output) -> String {
    format!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Bytes on disk of what kiln caches in `home` (blobs, stage records, kernel builds).
fn cache_usage(home: &Path) -> u64 {
    ["blobs", "stages", "kernel"]
        .iter()
        .map(|d| disk_usage(&home.join(d)))
        .sum()
}

/// The blobs a JSON document names: string values that are exactly `sha256:<hex>`, except
/// under fields that name keys rather than content (a step key, a kernel build key).
fn blobs_named(v: &serde_json::Value, field: &str, out: &mut BTreeSet<String>) {
    use serde_json::Value;
    match v {
        Value::String(s) if !["key", "boot"].contains(&field) => {
            if let Some(hex) = s.strip_prefix("sha256:")
                && hex.len() == 64
                && hex.bytes().all(|b| b.is_ascii_hexdigit())
            {
                out.insert(hex.to_string());
            }
        }
        Value::Array(items) => items.iter().for_each(|i| blobs_named(i, field, out)),
        Value::Object(map) => map.iter().for_each(|(k, v)| blobs_named(v, k, out)),
        _ => {}
    }
}

fn json_blobs(bytes: &[u8]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(bytes) {
        blobs_named(&v, "", &mut out);
    }
    out
}

/// Stage records in `home` that name a blob the home does not have. A manifest (a JSON blob)
/// names its files the same way, so they are followed one level down.
fn records_naming_missing_blobs(home: &Path) -> Vec<String> {
    let blobs = home.join("blobs/sha256");
    let mut broken = Vec::new();
    for path in common::walk(&home.join("stages")) {
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        for hex in json_blobs(&std::fs::read(&path).unwrap_or_default()) {
            let blob = blobs.join(&hex);
            let Ok(bytes) = std::fs::read(&blob) else {
                broken.push(format!("{} names missing {hex}", path.display()));
                continue;
            };
            if bytes.first() == Some(&b'{') {
                for file in json_blobs(&bytes) {
                    if !blobs.join(&file).is_file() {
                        broken.push(format!(
                            "{} names manifest {hex}, whose file {file} is missing",
                            path.display()
                        ));
                    }
                }
            }
        }
    }
    broken
}

/// Count the stage records in `home`.
fn record_count(home: &Path) -> usize {
    common::walk(&home.join("stages"))
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .count()
}

/// Every file under `dir` with its length.
fn listing(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out: Vec<(PathBuf, u64)> = common::walk(dir)
        .into_iter()
        .filter_map(|p| Some((p.clone(), p.symlink_metadata().ok()?.len())))
        .collect();
    out.sort();
    out
}

/// `kiln build` of minimal.yaml (direct boot) in `home`: the report.
fn build(home: &Path, out: &Path) -> serde_json::Value {
    let o = kiln(home)
        .args([
            "build",
            "recipes/minimal.yaml",
            "--profile",
            "direct",
            "--json",
            "-o",
        ])
        .arg(out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", show(&o));
    serde_json::from_slice(&o.stdout).expect("JSON report")
}

#[test]
fn gc_keeps_what_retained_records_name_and_a_collected_build_is_a_clean_miss() {
    let home = seeded_home();
    let out = tempfile::tempdir().unwrap();
    let first = build(home.path(), out.path());
    let image = PathBuf::from(first["image"].as_str().unwrap());
    let digest = sha256(&image);
    assert!(record_count(home.path()) > 0);
    let broken = records_naming_missing_blobs(home.path());
    assert!(broken.is_empty(), "{broken:#?}");

    // --dry-run removes nothing: the same files, the same sizes.
    let before = listing(home.path());
    let o = kiln(home.path())
        .args(["gc", "--keep-days", "0", "--dry-run", "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", show(&o));
    let dry: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        dry["local"]["kinds"][0]["removed"].as_u64().unwrap() > 0,
        "{dry}"
    );
    assert_eq!(listing(home.path()), before);

    // A budget that keeps some records: whatever stays is whole (no kept record names a blob
    // that went), and the unrelated blobs of the shared cache went.
    let budget = cache_usage(home.path()) / 40;
    let o = kiln(home.path())
        .args(["gc", "--max-size", &budget.to_string()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", show(&o));
    let kept = record_count(home.path());
    assert!(kept > 0, "the budget keeps some records");
    assert!(
        records_naming_missing_blobs(home.path()).is_empty(),
        "{:?}",
        records_naming_missing_blobs(home.path())
    );
    assert!(cache_usage(home.path()) <= budget);
    // What stayed is usable: the rebuild gives the same image, some stages hit.
    let out2 = tempfile::tempdir().unwrap();
    let second = build(home.path(), out2.path());
    assert_eq!(sha256(Path::new(second["image"].as_str().unwrap())), digest);
    assert!(
        common::stage_caches(&second)
            .iter()
            .any(|(_, c)| c == "hit"),
        "{:?}",
        common::stage_caches(&second)
    );

    // Keep nothing: every record and blob goes; the next build is a clean miss everywhere a
    // record is kept, and gives the same image.
    let o = kiln(home.path())
        .args(["gc", "--keep-days", "0"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", show(&o));
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(
        table.contains("records") && table.contains("freed"),
        "{table}"
    );
    assert_eq!(record_count(home.path()), 0);
    assert_eq!(
        std::fs::read_dir(home.path().join("blobs/sha256"))
            .unwrap()
            .count(),
        0
    );
    // The packages come back from the shared download cache (as a package cache would give
    // them): no record came back, so every recorded stage runs again.
    common::link_shared_blobs(home.path());
    let out3 = tempfile::tempdir().unwrap();
    let third = build(home.path(), out3.path());
    assert_eq!(sha256(Path::new(third["image"].as_str().unwrap())), digest);
    for (stage, cache) in common::stage_caches(&third) {
        if ["rootfs", "kernel", "disk", "verify"].contains(&stage.as_str()) {
            assert_eq!(cache, "miss", "{stage}");
        }
    }
}

#[test]
fn gc_while_builds_run_fails_no_build_and_keeps_the_cache_under_budget() {
    let server = PrivateServer::start().unwrap();
    let url = server.url();
    let home = seeded_home();
    let budget: u64 = 8 << 20;
    let port = free_port();
    let log = home.path().join("up.log");
    let up = Running::spawn(
        {
            let mut c = kiln(home.path());
            c.args([
                "up",
                "--nats",
                &url,
                "--listen",
                &format!("127.0.0.1:{port}"),
            ])
            .args(["--cache-max", &budget.to_string()])
            .args(common::recipe_roots());
            c
        },
        &log,
    );
    let before = cache_usage(home.path());

    // `kiln gc --max-size` far below the cache, again and again while builds run.
    let stop = Arc::new(AtomicBool::new(false));
    let collector = {
        let stop = stop.clone();
        let home = home.path().to_path_buf();
        std::thread::spawn(move || {
            let mut runs = 0;
            let mut freed = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let o = kiln(&home)
                    .args(["gc", "--max-size", "1M", "--json"])
                    .output()
                    .unwrap();
                assert!(o.status.success(), "{}", show(&o));
                let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
                freed += r["local"]["kinds"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|k| k["freed_bytes"].as_u64().unwrap())
                    .sum::<u64>();
                runs += 1;
                std::thread::sleep(std::time::Duration::from_millis(300));
            }
            (runs, freed)
        })
    };
    let submit = |hostname: &str| {
        let mut c = kiln(home.path());
        c.args(["submit", "recipes/minimal.yaml", "--profile", "direct"])
            .args(["--set", &format!("hostname={hostname}")])
            .args(["--follow", "--timeout", "600", "--json", "--nats", &url])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c.spawn().unwrap()
    };
    let image_of = |o: &Output| -> String {
        assert!(o.status.success(), "{}\nworker log:\n{}", show(o), up.log());
        let events = json_lines(o);
        let done = events.last().unwrap();
        assert_eq!(done["stage"], "publish", "{done}");
        assert_eq!(done["kind"], "completed", "{done}");
        events
            .iter()
            .find(|e| e["stage"] == "disk" && e["kind"] == "completed")
            .and_then(|e| e["outputs"]["disk"]["image"].as_str())
            .unwrap_or_else(|| panic!("no disk image in {events:?}"))
            .to_string()
    };
    let hosts = ["gc-a", "gc-b", "gc-c"];
    let children: Vec<_> = hosts.iter().map(|h| submit(h)).collect();
    let images: Vec<String> = children
        .into_iter()
        .map(|c| image_of(&c.wait_with_output().unwrap()))
        .collect();
    stop.store(true, Ordering::SeqCst);
    let (runs, freed) = collector.join().unwrap();
    assert!(runs >= 2 && freed > 0, "gc ran {runs} times, freed {freed}");
    assert_eq!(
        images.iter().collect::<BTreeSet<_>>().len(),
        3,
        "different hostnames, different images: {images:?}"
    );

    // Collected once more with nothing running: under the budget, measured here.
    let o = kiln(home.path())
        .args(["gc", "--max-size", &budget.to_string()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", show(&o));
    let after = cache_usage(home.path());
    eprintln!("cache before {before} bytes, after {after} bytes, {runs} collections");
    assert!(after <= budget, "{after} > {budget}");
    assert!(records_naming_missing_blobs(home.path()).is_empty());

    // A rebuild gives the same image as before.
    let again = submit(hosts[0]).wait_with_output().unwrap();
    assert_eq!(image_of(&again), images[0]);

    // /metrics of kiln up: valid for Prometheus, with what these builds did.
    let text = checked_metrics(&format!("http://127.0.0.1:{port}/metrics"));
    let refetched = up.log().matches("fetching it again").count();
    let retries: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("kiln_stage_retries_total"))
        .collect();
    eprintln!("stages that refetched a collected blob: {refetched}; retries: {retries:?}");
    // The worker collected its own cache too (--cache-max), after stages.
    assert!(
        up.log().contains("over --cache-max"),
        "no --cache-max collection in the worker log:\n{}",
        up.log()
    );
    let succeeded = sample(&text, "kiln_builds_total{state=\"succeeded\"}").unwrap_or(0.0);
    assert!(succeeded >= 4.0, "{text}");
    for stage in [
        "source", "render", "rootfs", "kernel", "disk", "verify", "publish",
    ] {
        let count = sample(
            &text,
            &format!("kiln_stage_duration_seconds_count{{stage=\"{stage}\"}}"),
        )
        .unwrap_or(0.0);
        assert!(count >= 4.0, "{stage}: {text}");
        let pending = sample(
            &text,
            &format!("kiln_stage_pending_messages{{stage=\"{stage}\"}}"),
        );
        assert_eq!(pending, Some(0.0), "{stage}: {text}");
    }
    let misses = sample(
        &text,
        "kiln_stage_cache_total{stage=\"disk\",result=\"miss\"}",
    );
    assert!(misses.unwrap_or(0.0) >= 3.0, "{text}");
    assert!(
        sample(&text, "kiln_cache_bytes").is_some_and(|b| b > 0.0),
        "{text}"
    );
    assert!(
        sample(&text, "kiln_object_store_bytes").is_some_and(|b| b > 1e6),
        "{text}"
    );

    // The shared buckets, collected with nothing kept: the object store and the stage records
    // are empty (asked of the server here, not of kiln), and the next build is a clean miss that
    // gives the same image.
    let o = kiln(home.path())
        .args([
            "gc",
            "--keep-days",
            "0",
            "--min-age",
            "0",
            "--json",
            "--nats",
            &url,
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", show(&o));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        r["remote"]["kinds"][0]["removed"].as_u64().unwrap() > 0,
        "{r}"
    );
    let (objects, records) = bucket_contents(&url);
    assert_eq!(
        (objects, records),
        (0, 0),
        "object chunks, stage records left"
    );
    let o = kiln(home.path())
        .args(["gc", "--keep-days", "0"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", show(&o));
    common::link_shared_blobs(home.path());
    let fresh = submit(hosts[1]).wait_with_output().unwrap();
    assert_eq!(image_of(&fresh), images[1]);
    let misses: Vec<String> = json_lines(&fresh)
        .iter()
        .filter(|e| e["kind"] == "completed" && e["cache"] == "miss")
        .map(|e| e["stage"].as_str().unwrap().to_string())
        .collect();
    for stage in ["rootfs", "kernel", "disk", "verify"] {
        assert!(misses.iter().any(|s| s == stage), "{stage} hit: {misses:?}");
    }
    // The worker uploaded what it made again, though it had seen those objects in the bucket
    // before they were collected: another host could take the next stage.
    let (objects, records) = bucket_contents(&url);
    assert!(
        objects > 0 && records > 0,
        "{objects} chunks, {records} records"
    );
    let image_there = common::rt().block_on(async {
        let client = async_nats::connect(&url).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let store = js.get_object_store("kiln-blobs").await.unwrap();
        // A deleted object's metadata stays, marked deleted.
        store.info(&images[1]).await.is_ok_and(|i| !i.deleted)
    });
    assert!(
        image_there,
        "image {} is not in the object store",
        images[1]
    );
    drop(up);
}

/// Chunks in the object store and stage records in the KV bucket, asked of the server.
fn bucket_contents(url: &str) -> (usize, usize) {
    common::rt().block_on(async {
        let client = async_nats::connect(url).await.unwrap();
        let js = async_nats::jetstream::new(client);
        // Chunks are stored under $O.<bucket>.C.<nuid>; a deleted object leaves only a small
        // deletion marker under $O.<bucket>.M.<name>.
        let obj = js.get_stream("OBJ_kiln-blobs").await.unwrap();
        let mut chunks = obj.info_with_subjects("$O.kiln-blobs.C.>").await.unwrap();
        let mut objects = 0;
        while let Some(s) = futures::StreamExt::next(&mut chunks).await {
            objects += s.unwrap().1;
        }
        let kv = js.get_key_value("kiln-stages").await.unwrap();
        let mut keys = kv.keys().await.unwrap();
        let mut stage_records = 0;
        while let Some(k) = futures::StreamExt::next(&mut keys).await {
            let k = k.unwrap();
            if !k.starts_with("state/") && !k.starts_with("build-id/") {
                stage_records += 1;
            }
        }
        (objects, stage_records)
    })
}
