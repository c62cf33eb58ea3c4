//! kiln's build stages as NATS JetStream workers, end to end: a real private `nats-server`, real
//! `kiln up` / `kiln worker` processes, real package downloads (shared with other test runs
//! through `/var/tmp/kiln-test-cache`) and real QEMU boots.

use kiln::bus::PrivateServer;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

mod common;
use common::{Running, json_lines, kiln, shared_home, walk};

fn show(o: &Output, log: &Path) -> String {
    format!(
        "stdout:\n{}\nstderr:\n{}\nworker log:\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
        std::fs::read_to_string(log).unwrap_or_default()
    )
}

#[test]
fn kiln_up_builds_a_submitted_recipe_and_refuses_a_bad_one_once() {
    let server = PrivateServer::start().unwrap();
    let url = server.url();
    let home = shared_home();
    let log = home.path().join("up.log");
    let _up = Running::spawn(
        {
            let mut c = kiln(home.path());
            c.args(["up", "--nats", &url]).args(common::recipe_roots());
            c
        },
        &log,
    );

    // A bad recipe: exactly one failed message, with file:line:column, and no retry.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "name: bad\nversion: \"1\"\nkernal:\n  package: x\n").unwrap();
    let o = kiln(home.path())
        .args([
            "submit",
            "--follow",
            "--timeout",
            "600",
            "--json",
            "--nats",
            &url,
        ])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", show(&o, &log));
    let events = json_lines(&o);
    let bad_id = events[0]["build"].as_str().unwrap().to_string();
    let failed = events.last().unwrap();
    assert_eq!(failed["kind"], "failed", "{}", show(&o, &log));
    assert_eq!(failed["stage"], "render");
    assert_eq!(failed["error"]["kind"], "recipe");
    assert!(
        failed["error"]["file"]
            .as_str()
            .unwrap()
            .ends_with("bad.yaml"),
        "{failed}"
    );
    assert_eq!(failed["error"]["line"], 3, "{failed}");
    assert!(failed["error"]["column"].as_u64().unwrap() >= 1, "{failed}");

    // A good recipe, booted directly (the fastest profile).
    let started = Instant::now();
    let o = kiln(home.path())
        .args([
            "submit",
            "recipes/minimal.yaml",
            "--profile",
            "direct",
            "--follow",
            "--timeout",
            "600",
            "--json",
            "--nats",
            &url,
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", show(&o, &log));
    eprintln!(
        "build through NATS: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let events = json_lines(&o);
    let id = events[0]["build"].as_str().unwrap().to_string();
    // publish ends the build; minimal.yaml has no publish: section, so it is skipped.
    let published = events.last().unwrap();
    assert_eq!(published["kind"], "completed", "{published}");
    assert_eq!(published["stage"], "publish");
    assert!(
        published["outputs"]["skipped"]
            .as_str()
            .unwrap()
            .contains("no publish"),
        "{published}"
    );
    let last = events
        .iter()
        .rev()
        .find(|e| e["kind"] == "completed" && e["stage"] == "verify")
        .unwrap();
    assert_eq!(
        last["outputs"]["verify.direct"]["profile"], "direct",
        "{last}"
    );
    let marker = last["outputs"]["verify.direct"]["marker_line"]
        .as_str()
        .unwrap();
    assert!(!marker.is_empty(), "{last}");
    // Every stage completed, in order.
    let order: Vec<&str> = events
        .iter()
        .filter(|e| e["kind"] == "completed")
        .map(|e| e["stage"].as_str().unwrap())
        .collect();
    assert_eq!(
        order,
        [
            "source", "render", "rootfs", "kernel", "disk", "verify", "publish"
        ]
    );

    // Status: every stage completed, with cache and worker.
    let o = kiln(home.path())
        .args(["status", &id, "--json", "--nats", &url])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", show(&o, &log));
    let status: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let stages = status["stages"].as_array().unwrap();
    let names: Vec<&str> = stages
        .iter()
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "source", "render", "rootfs", "kernel", "disk", "verify", "publish"
        ]
    );
    for s in stages {
        assert_eq!(s["status"], "completed", "{s}");
        assert!(
            ["hit", "miss"].contains(&s["cache"].as_str().unwrap()),
            "{s}"
        );
        assert!(s["worker"].as_str().unwrap().contains('/'), "{s}");
    }

    // The bad build still has exactly one failed message and was started once (no retry).
    let o = kiln(home.path())
        .args(["status", &bad_id, "--json", "--nats", &url])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let status: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let render = &status["stages"][1];
    assert_eq!(render["status"], "failed", "{status}");
    let raw = history(&url, &bad_id);
    let failed = raw.iter().filter(|s| s.ends_with(".failed")).count();
    let render_started = raw
        .iter()
        .filter(|s| s.ends_with(".render.started"))
        .count();
    assert_eq!((failed, render_started), (1, 1), "{raw:?}");
}

/// Every message subject of a build in the stream, in order.
fn history(url: &str, build: &str) -> Vec<String> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let bus = kiln::bus::Bus::connect_url(url).await.unwrap();
        bus.build_events(build)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.subject)
            .collect()
    })
}

#[test]
fn two_workers_on_separate_homes_build_a_raw_request_through_the_object_store() {
    let server = PrivateServer::start().unwrap();
    let url = server.url();
    // Worker A shares downloads with other test runs; worker B has a blob store of its own.
    let home_a = shared_home();
    let home_b = tempfile::tempdir().unwrap();
    let log_a = home_a.path().join("a.log");
    let log_b = home_b.path().join("b.log");
    let a = Running::spawn(
        {
            let mut c = kiln(home_a.path());
            c.args(["worker", "--nats", &url, "--stages", "source,render,rootfs"])
                .args(common::recipe_roots());
            c
        },
        &log_a,
    );
    let b = Running::spawn(
        {
            let mut c = kiln(home_b.path());
            c.args(["worker", "--nats", &url, "--stages", "kernel,disk,verify"])
                .args(common::recipe_roots());
            c
        },
        &log_b,
    );
    let logs = || {
        format!(
            "A:\n{}\nB:\n{}",
            std::fs::read_to_string(&log_a).unwrap_or_default(),
            std::fs::read_to_string(&log_b).unwrap_or_default()
        )
    };

    // Subscribe, then publish the request exactly as docs/messages.md shows it.
    let mut raw = common::raw_nats::RawNats::connect(server.port());
    raw.send(b"SUB kiln.build.> 1\r\n");
    // Make sure the workers have set up the stream before the request is published.
    std::thread::sleep(Duration::from_secs(3));
    let request =
        br#"{ "v": 1, "recipe": { "path": "recipes/minimal.yaml" }, "requester": "alice" }"#;
    raw.publish_with_reply("kiln.build.requested", "_INBOX.raw.ack", request);
    raw.send(b"SUB _INBOX.raw.ack 2\r\n");
    let deadline = Instant::now() + Duration::from_secs(900);
    let mut completed: Vec<(String, serde_json::Value)> = Vec::new();
    loop {
        assert!(
            Instant::now() < deadline,
            "timed out; {completed:?}\n{}",
            logs()
        );
        let Some((subject, payload)) = raw.next() else {
            continue;
        };
        if !subject.ends_with(".completed") && !subject.ends_with(".failed") {
            continue;
        }
        let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        assert!(!subject.ends_with(".failed"), "{subject}: {v}\n{}", logs());
        let stage = v["stage"].as_str().unwrap().to_string();
        completed.push((stage.clone(), v));
        if stage == "verify" {
            break;
        }
    }
    // The request had no id: the source stage assigned one like `20261126T022407Z-0000002a`.
    let id = completed[0].1["build"].as_str().unwrap();
    let (stamp, seq) = id.split_once("Z-").unwrap();
    assert_eq!((stamp.len(), &stamp[8..9], seq.len()), (15, "T", 8), "{id}");
    assert!(completed.iter().all(|(_, v)| v["build"] == id));
    let worker = |stage: &str| {
        completed
            .iter()
            .find(|(s, _)| s == stage)
            .map(|(_, v)| v["worker"].as_str().unwrap().to_string())
            .unwrap()
    };
    let pid_a = format!("/{}", a.pid());
    let pid_b = format!("/{}", b.pid());
    for s in ["source", "render", "rootfs"] {
        assert!(worker(s).ends_with(&pid_a), "{s} ran on {}", worker(s));
    }
    for s in ["kernel", "disk", "verify"] {
        assert!(worker(s).ends_with(&pid_b), "{s} ran on {}", worker(s));
    }
    // B got the rootfs manifest and its files through the object store.
    let rootfs = &completed.iter().find(|(s, _)| s == "rootfs").unwrap().1;
    let manifest = rootfs["outputs"]["rootfs"]["manifest"].as_str().unwrap();
    let hex = manifest.trim_start_matches("sha256:");
    let found = walk(&home_b.path().join("blobs"))
        .iter()
        .any(|p| p.file_name().unwrap().to_string_lossy().contains(hex));
    assert!(found, "B's blob store lacks the rootfs manifest {manifest}");
    let verify = &completed.last().unwrap().1;
    let boots: Vec<&String> = verify["outputs"].as_object().unwrap().keys().collect();
    assert!(!boots.is_empty(), "{verify}");
    drop(a);
    drop(b);
}

/// With no worker running, `kiln submit --follow --timeout` gives up following on time, says that
/// the build goes on and how to find it, and the request stays on the stream for workers to come.
#[test]
fn submit_follow_gives_up_after_its_timeout_and_says_the_build_goes_on() {
    let server = PrivateServer::start().unwrap();
    let url = server.url();
    let home = shared_home();
    let started = Instant::now();
    let o = kiln(home.path())
        .args([
            "submit",
            "recipes/minimal.yaml",
            "--id",
            "20261206T000000Z-0000aaaa",
        ])
        .args(["--follow", "--timeout", "2", "--nats", &url])
        .output()
        .unwrap();
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("build 20261206T000000Z-0000aaaa did not end within --timeout 2 s")
            && stderr.contains("kiln status 20261206T000000Z-0000aaaa"),
        "{stderr}"
    );
    assert!(took < Duration::from_secs(30), "gave up after {took:?}");

    // The request was stored: `kiln status` lists it as waiting.
    let o = kiln(home.path())
        .args(["status", "--json", "--nats", &url])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("20261206T000000Z-0000aaaa"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );

    // --timeout without --follow is refused by the parser.
    let o = kiln(home.path())
        .args([
            "submit",
            "recipes/minimal.yaml",
            "--timeout",
            "5",
            "--nats",
            &url,
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--follow"));
}
