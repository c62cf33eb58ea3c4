//! `kiln build` through NATS and the commands that read a build back from the stream, end to
//! end with a real `nats-server`, real `kiln` processes, real package downloads (shared through
//! `/var/tmp/kiln-test-cache`) and real QEMU boots:
//! - `kiln build` with no URL: a private server, every worker in process, the outputs in `-o`,
//!   progress on the stream, and no server process or temp dir left behind;
//! - `kiln build` without nats-server, and with a bad recipe: clear errors, nothing in `-o`;
//! - `kiln up` + `kiln submit` + `kiln logs -f` following a build live, `kiln logs` of a finished
//!   build, `kiln build --nats URL` fetching the image through the object store, `kiln status`
//!   listing the builds.

use kiln::bus::PrivateServer;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;
use common::{Running, kiln, sha256_digest, shared_home};

fn show(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// JSON objects, one per line.
fn json_lines(text: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(text)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    names(Path::new("/proc"))
        .into_iter()
        .filter(|n| n.chars().all(|c| c.is_ascii_digit()))
        .filter_map(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            cmd.contains(needle).then(|| format!("{pid}: {cmd}"))
        })
        .collect()
}

/// The stage names of a `kiln build --json` report, in order.
fn stage_names(report: &serde_json::Value) -> Vec<String> {
    report["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stage"].as_str().unwrap().to_string())
        .collect()
}

/// Whether every stage that records its results (source, render and publish run every time)
/// and every recorded step was found recorded.
fn all_recorded_hit(report: &serde_json::Value) -> bool {
    let stages = report["stages"].as_array().unwrap();
    let recorded: Vec<&serde_json::Value> = stages
        .iter()
        .filter(|s| s["steps"].as_array().is_some_and(|steps| !steps.is_empty()))
        .collect();
    let names: Vec<&str> = recorded
        .iter()
        .filter_map(|s| s["stage"].as_str())
        .collect();
    names == ["rootfs", "kernel", "disk", "verify"]
        && recorded.iter().all(|s| {
            s["cache"] == "hit"
                && s["steps"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|step| step["cache"] == "hit")
        })
}

#[test]
fn build_runs_through_a_private_server_and_leaves_nothing_behind() {
    let home = shared_home();
    let out = tempfile::tempdir().unwrap();
    // The private server's temp dir goes here, so we can see that it is removed.
    let tmp = tempfile::tempdir().unwrap();
    let o = kiln(home.path())
        .env("TMPDIR", tmp.path())
        .args([
            "build",
            "recipes/minimal.yaml",
            "--profile",
            "direct",
            "--json",
            "-o",
        ])
        .arg(out.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", show(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON report");
    let image = PathBuf::from(report["image"].as_str().unwrap());
    assert_eq!(image.parent().unwrap(), out.path());
    assert_eq!(
        names(out.path()),
        [
            "minimal-1.0.0.qcow2",
            "minimal-1.0.0.qcow2.report.json",
            "minimal-1.0.0.qcow2.serial.log",
            "minimal-1.0.0.qcow2.spdx.json"
        ]
    );
    let serial =
        std::fs::read_to_string(out.path().join("minimal-1.0.0.qcow2.serial.log")).unwrap();
    assert!(serial.contains("kiln-boot-ok"), "{serial}");
    let check = Command::new("qemu-img")
        .arg("check")
        .arg(&image)
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", show(&check));
    // The stages ran (this home has no stage records of its own) and are in the report.
    let stages: Vec<(String, String)> = report["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["stage"].as_str().unwrap().to_string(),
                s["cache"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let plan: Vec<&str> = stages.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(
        plan,
        [
            "source", "render", "rootfs", "kernel", "disk", "verify", "publish"
        ]
    );
    assert!(stages.iter().any(|(s, c)| s == "disk" && c == "miss"));
    assert_eq!(report["boots"][0]["profile"], "direct");

    // --json: the build's events from the stream on stderr, the disk stage's progress among
    // them, every stage from source to verify started and completed.
    let events = json_lines(&o.stderr);
    let build = events[0]["build"].as_str().unwrap();
    assert!(events.iter().all(|e| e["build"] == build));
    let disk_progress: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["stage"] == "disk" && e["kind"] == "progress")
        .collect();
    assert!(!disk_progress.is_empty(), "{}", show(&o));
    assert!(
        disk_progress
            .iter()
            .any(|e| e["fraction"] == 1.0 && e["message"].as_str().unwrap().contains("MiB")),
        "{disk_progress:?}"
    );
    for stage in ["source", "render", "rootfs", "kernel", "disk", "verify"] {
        for kind in ["started", "completed"] {
            assert!(
                events
                    .iter()
                    .any(|e| e["stage"] == stage && e["kind"] == kind),
                "no {stage} {kind}: {}",
                show(&o)
            );
        }
    }
    assert!(
        events
            .iter()
            .any(|e| e["stage"] == "verify" && e["kind"] == "progress"),
        "{}",
        show(&o)
    );

    // Nothing left: no temp dir, no server.
    assert_eq!(names(tmp.path()), Vec::<String>::new());
    let tmp_text = tmp.path().display().to_string();
    assert_eq!(processes_mentioning(&tmp_text), Vec::<String>::new());

    // The same build without NATS gives the same image, all from the cache.
    let out2 = tempfile::tempdir().unwrap();
    let o = kiln(home.path())
        .args([
            "build",
            "recipes/minimal.yaml",
            "--profile",
            "direct",
            "--json",
            "--no-bus",
            "-o",
        ])
        .arg(out2.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", show(&o));
    let direct: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(direct["image_digest"], report["image_digest"]);
    // The same seven stages, in the same order, both ways; every recorded one a hit.
    assert_eq!(stage_names(&direct), stage_names(&report));
    assert!(all_recorded_hit(&direct), "{direct}");
}

#[test]
fn missing_server_and_bad_recipes_are_clear_errors() {
    let home = shared_home();

    // No nats-server: the error names the Debian package; nothing in -o.
    let out = tempfile::tempdir().unwrap();
    let empty = tempfile::tempdir().unwrap();
    let o = kiln(home.path())
        .env("PATH", empty.path())
        .env("KILN_NATS_SERVER", empty.path().join("nats-server"))
        .args(["build", "recipes/minimal.yaml", "-o"])
        .arg(out.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(err.contains("Debian package `nats-server`"), "{err}");
    assert!(err.contains("apt-get install nats-server"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(names(out.path()), Vec::<String>::new());

    // A bad recipe: exit 2, file:line:column from the render stage's failed message, with the
    // source line; nothing in -o.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "name: bad\nversion: \"1\"\nkernal:\n  package: x\n").unwrap();
    let o = kiln(home.path())
        .arg("build")
        .arg(&bad)
        .arg("-o")
        .arg(out.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    assert!(err.contains(&format!("{}:3:1", bad.display())), "{err}");
    assert!(err.contains("kernal"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(names(out.path()), Vec::<String>::new());
}

#[test]
fn logs_follow_a_build_live_and_status_lists_builds() {
    let server = PrivateServer::start().unwrap();
    let url = server.url();
    let worker_home = shared_home();
    let log = worker_home.path().join("up.log");
    let _up = Running::new(
        kiln(worker_home.path())
            .args(["up", "--nats", &url])
            .args(common::recipe_roots())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let worker_log = || std::fs::read_to_string(&log).unwrap_or_default();

    // Submit, then follow it live from another process to its end.
    let o = kiln(worker_home.path())
        .args([
            "submit",
            "recipes/minimal.yaml",
            "--profile",
            "direct",
            "--nats",
            &url,
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", show(&o));
    let id = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let o = kiln(worker_home.path())
        .args(["logs", "-f", &id, "--json", "--nats", &url])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}\n{}", show(&o), worker_log());
    let events = json_lines(&o.stdout);
    let last = events.last().unwrap();
    assert_eq!(
        (&last["stage"], &last["kind"]),
        (&"publish".into(), &"completed".into())
    );
    assert!(events.iter().all(|e| e["build"] == id.as_str()));
    assert!(
        events
            .iter()
            .any(|e| e["stage"] == "disk" && e["kind"] == "progress"),
        "{}",
        show(&o)
    );
    // The stages really ran while we followed (the worker's home had no records).
    assert!(
        events
            .iter()
            .any(|e| e["stage"] == "kernel" && e["kind"] == "completed" && e["cache"] == "miss")
    );

    // The finished build's events, one human line each, in the same order.
    let o = kiln(worker_home.path())
        .args(["logs", &id, "--nats", &url])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", show(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), events.len(), "{text}");
    assert!(
        lines[0].contains("source") && lines[0].contains("started"),
        "{text}"
    );
    let done = lines.last().unwrap();
    assert!(
        done.contains("publish") && done.contains("completed"),
        "{text}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("disk") && l.contains("progress") && l.contains("MiB")),
        "{text}"
    );

    // `kiln build --nats` from a host with an empty cache: the workers build it (all cache
    // hits now) and the image comes through the object store.
    let client_home = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let mut raw = common::raw_nats::RawNats::connect(server.port());
    let before = raw.last_sequence("KILN");
    let o = kiln(client_home.path())
        .args([
            "build",
            "recipes/minimal.yaml",
            "--profile",
            "direct",
            "--json",
            "--nats",
            &url,
            "-o",
        ])
        .arg(out.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}\n{}", show(&o), worker_log());
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let image = out.path().join("minimal-1.0.0.qcow2");
    assert_eq!(
        report["image_digest"].as_str().unwrap(),
        sha256_digest(&image)
    );
    assert!(all_recorded_hit(&report), "{report}");
    // The serial log of the boot on the worker came through the object store too.
    let serial = std::fs::read_to_string(out.path().join("minimal-1.0.0.qcow2.serial.log"))
        .expect("the serial log in -o");
    assert!(serial.contains("kiln-boot-ok"), "{serial}");
    let remote_build = json_lines(&o.stderr)[0]["build"]
        .as_str()
        .unwrap()
        .to_string();
    // Small messages: everything this cached build put in the stream, as the server itself
    // answers (STREAM.MSG.GET), is at most 10 KB of payload (it was ~70 KB while every
    // `completed` carried the whole state).
    let stored = raw.messages_after("KILN", before);
    let prefix = format!("kiln.build.{remote_build}.");
    let mine: Vec<&(String, usize)> = stored
        .iter()
        .filter(|(s, _)| s.starts_with(&prefix) || s == "kiln.build.requested")
        .collect();
    let total: usize = mine.iter().map(|(_, n)| n).sum();
    eprintln!(
        "cached build {remote_build}: {} messages, {total} bytes of payload: {mine:?}",
        mine.len()
    );
    assert_eq!(mine.len(), stored.len(), "{stored:?}");
    assert!(
        mine.iter()
            .filter(|(s, _)| s.ends_with(".completed"))
            .count()
            == 7,
        "{mine:?}"
    );
    assert!(total <= 10 * 1024, "{total} bytes: {mine:?}");

    // A bad recipe through the same server fails at render.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "name: bad\nversion: \"1\"\nkernal:\n  package: x\n").unwrap();
    let o = kiln(client_home.path())
        .args(["build", "--nats", &url, "-o"])
        .arg(out.path())
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));

    // Recent builds, newest first, from the build index.
    let o = kiln(client_home.path())
        .args(["status", "--json", "--nats", &url])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", show(&o));
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let builds = list["builds"].as_array().unwrap();
    assert_eq!(builds.len(), 3, "{list}");
    assert_eq!(builds[0]["state"], "failed", "{list}");
    assert_eq!(builds[0]["stage"], "render", "{list}");
    assert_eq!(builds[0]["error"]["line"], 3, "{list}");
    assert_eq!(builds[1]["id"], remote_build.as_str());
    assert_eq!(builds[1]["state"], "completed");
    assert_eq!(builds[1]["image"], report["image_digest"], "{list}");
    assert!(
        builds[0]["requested_ms"].as_u64() >= builds[1]["requested_ms"].as_u64()
            && builds[1]["requested_ms"].as_u64() >= builds[2]["requested_ms"].as_u64(),
        "{list}"
    );
    assert_eq!(builds[2]["id"], id.as_str());
    assert_eq!(builds[2]["stage"], "publish");
    assert!(
        builds[2]["recipe"]
            .as_str()
            .unwrap()
            .ends_with("recipes/minimal.yaml")
    );
    let o = kiln(client_home.path())
        .args(["status", "--limit", "1", "--nats", &url])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.starts_with("BUILD"), "{text}");
    assert!(text.contains("failed") && text.contains(":3:1"), "{text}");
    assert!(!text.contains(&id), "{text}");
    let o = kiln(client_home.path())
        .args(["status", "--limit", "2", "--json", "--nats", &url])
        .output()
        .unwrap();
    let two: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(two["builds"].as_array().unwrap()[..], builds[..2], "{two}");
}

/// `kiln rollout` refuses what it cannot roll out, with exit 2 and a message that says what to
/// do: a tag instead of a digest, a bad group or wave list, a group with no agents, an unknown
/// rollout; nothing is created for them.
#[test]
fn rollout_arguments_that_cannot_work_are_clear_errors() {
    let home = shared_home();
    let server = PrivateServer::start().unwrap();
    let url = server.url();
    let digest = format!("sha256:{}", "a".repeat(64));
    let image = format!("127.0.0.1:9/kiln/app@{digest}");
    let cases: [(Vec<String>, &str); 5] = [
        (
            vec![
                "127.0.0.1:9/kiln/app:latest".into(),
                "--group".into(),
                "web".into(),
            ],
            "by digest",
        ),
        (
            vec![image.clone(), "--group".into(), "no spaces".into()],
            "a group is 1 to 64 letters",
        ),
        (
            vec![
                image.clone(),
                "--group".into(),
                "web".into(),
                "--waves".into(),
                "0,101%".into(),
            ],
            "a wave is a number of hosts",
        ),
        (
            vec![image.clone(), "--group".into(), "web".into()],
            "no agent of group web",
        ),
        (vec!["status".into(), "r-nope".into()], "no rollout r-nope"),
    ];
    for (args, expect) in cases {
        let o = kiln(home.path())
            .arg("rollout")
            .args(&args)
            .args(["--nats", &url])
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", show(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(expect), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let o = kiln(home.path())
        .args(["rollout", "list", "--nats", &url])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", show(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "no rollouts");
}
