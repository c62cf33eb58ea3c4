//! Stage records never point at nothing, and bytes are checked where they matter: end to end with
//! real `kiln` processes, a real `nats-server`, a real registry (`docker-registry`), real Debian
//! packages (through the shared test cache) and real QEMU boots. The oracles are not kiln's:
//! `sha256sum` of what is delivered, the registry's own API, the NATS client's view of the object
//! store and KV bucket, and the file system (`mount -t tmpfs`).
//! - one byte flipped in the cached image: `kiln build` (in process and over a private bus)
//!   notices, says so, and delivers the image with the right digest;
//! - one byte flipped (size and mtime kept) under a `kiln up` that keeps running: verify and
//!   publish notice, fetch the image again from the object store, boot and push the right bytes;
//! - a shared record whose image is gone from the object store, on a fresh worker: a clean miss
//!   that rebuilds and records again;
//! - the object store and KV buckets deleted while a worker runs: made again, the build succeeds;
//! - a full disk under `$KILN_HOME`: reported at once as `no_space` naming the path, nothing
//!   half-written or recorded, and the next build after space is freed is right.

use kiln::bus::PrivateServer;
use std::path::{Path, PathBuf};
use std::process::Output;

mod common;
use common::jetstream::Nats;
use common::registry::start_registry;
use common::{
    Running, Tmpfs, flip_byte, json_lines, json_report, kiln, own_blobs_home, sha256_digest, walk,
};

fn show(o: &Output, log: &str) -> String {
    format!(
        "stdout:\n{}\nstderr:\n{}\nworker log:\n{log}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Where the local store keeps a blob.
fn blob_path(home: &Path, digest: &str) -> PathBuf {
    home.join("blobs/sha256")
        .join(digest.strip_prefix("sha256:").unwrap())
}

/// The delivered image of a `kiln build --json` report, checked by `sha256sum` against the
/// digest the report gives; returns that digest.
fn delivered(report: &serde_json::Value) -> String {
    let digest = report["image_digest"].as_str().unwrap().to_string();
    let image = Path::new(report["image"].as_str().unwrap());
    assert_eq!(sha256_digest(image), digest, "the delivered image");
    digest
}

/// `kiln up` on `home` against `url`, without the HTTP API; its log in `logs`.
fn up(home: &Path, url: &str, extra: &[&str], logs: &Path) -> Running {
    let mut c = kiln(home);
    c.args(["up", "--nats", url, "--listen", "none"])
        .args(extra)
        .args(common::recipe_roots());
    Running::spawn(c, &logs.join("up.log"))
}

/// `kiln build RECIPE --nats URL --json -o OUT` from a client home of its own.
fn build_over(client: &Path, url: &str, recipe: &str, args: &[&str], out: &Path) -> Output {
    kiln(client)
        .args(["build", recipe, "--nats", url, "--json", "-o"])
        .arg(out)
        .args(args)
        .output()
        .unwrap()
}

/// The KV key of a stage step's record, from a build report's `stages[].steps[]`.
fn step_record_key(report: &serde_json::Value, step: &str) -> String {
    let key = report["stages"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["steps"].as_array().cloned().unwrap_or_default())
        .find(|s| s["step"] == step)
        .unwrap_or_else(|| panic!("no {step} step in {report}"))["key"]
        .as_str()
        .unwrap()
        .to_string();
    format!("{step}/{}", key.replace(':', "="))
}

#[test]
fn a_corrupted_image_in_kiln_home_is_noticed_and_the_right_image_delivered() {
    let home = own_blobs_home(None);
    let set = common::unique_hostname("flip");
    let build = |out: &str, no_bus: bool| {
        let mut c = kiln(home.path());
        c.args(["build", "recipes/minimal.yaml", "--profile", "direct"])
            .args(["--set", &set, "--json", "-o"])
            .arg(home.path().join(out));
        if no_bus {
            c.arg("--no-bus");
        }
        c.output().unwrap()
    };
    let digest = delivered(&json_report(&build("out1", true)));
    let blob = blob_path(home.path(), &digest);
    assert!(
        !blob.is_symlink(),
        "the image is this test's own, not the shared cache's"
    );
    let len = std::fs::metadata(&blob).unwrap().len();
    // In process, then through a private bus: each time one byte of the cached image flipped.
    for (round, no_bus) in [(2, true), (3, false)] {
        flip_byte(&blob, len / 2 + round);
        assert_ne!(sha256_digest(&blob), digest);
        let o = build(&format!("out{round}"), no_bus);
        let report = json_report(&o);
        let err = stderr(&o);
        assert!(
            err.contains(&format!(
                "blob {digest} no longer matches its digest (damaged copy removed)"
            )),
            "round {round}: the build says what it found\n{err}"
        );
        assert!(
            err.contains("running it again") && err.contains("the disk stage"),
            "{err}"
        );
        assert_eq!(delivered(&report), digest, "round {round}");
        assert_eq!(
            sha256_digest(&blob),
            digest,
            "the store holds good bytes again"
        );
    }
}

#[test]
fn a_flipped_byte_under_a_running_worker_is_noticed_by_verify_and_publish() {
    let server = PrivateServer::start().unwrap();
    let url = server.url();
    let registry = start_registry(None);
    let host = format!("127.0.0.1:{}", registry.port);
    let worker = own_blobs_home(None);
    let client = tempfile::tempdir().unwrap();
    let up = up(worker.path(), &url, &["--publish-to", &host], client.path());
    let set = common::unique_hostname("served");
    let out = |n: &str| client.path().join(n);
    let args = |verify: bool| {
        let mut a = vec!["--set", &set];
        if !verify {
            a.push("--no-verify");
        }
        a
    };

    // Made (and uploaded) without a boot: nothing is published yet.
    let o = build_over(
        client.path(),
        &url,
        "recipes/app.yaml",
        &args(false),
        &out("1"),
    );
    let digest = delivered(&json_report(&o));
    let blob = blob_path(worker.path(), &digest);
    let len = std::fs::metadata(&blob).unwrap().len();

    // The worker keeps running and remembers it hashed the image; its size and mtime stay.
    flip_byte(&blob, len / 2);
    let o = build_over(
        client.path(),
        &url,
        "recipes/app.yaml",
        &args(true),
        &out("2"),
    );
    let report = json_report(&o);
    let err = stderr(&o);
    let refetched =
        format!("blob {digest} was damaged here: fetched it again from the object store");
    let verify_note = err
        .lines()
        .find(|l| l.contains(&refetched))
        .unwrap_or_else(|| {
            panic!(
                "verify says it fetched the image again\n{}",
                show(&o, &up.log())
            )
        });
    assert!(verify_note.contains("\"verify\""), "{verify_note}");
    assert_eq!(delivered(&report), digest);
    let boot = &report["boots"][0];
    assert!(
        !boot["marker_line"].as_str().unwrap_or("").is_empty(),
        "the good image booted: {report}"
    );
    assert_eq!(sha256_digest(&blob), digest);

    // Damaged again: verify is a recorded hit now, publish must notice before it signs and
    // pushes.
    flip_byte(&blob, len / 3);
    let o = build_over(
        client.path(),
        &url,
        "recipes/app.yaml",
        &args(true),
        &out("3"),
    );
    let report = json_report(&o);
    let err = stderr(&o);
    let publish_note = err
        .lines()
        .find(|l| l.contains(&refetched))
        .unwrap_or_else(|| {
            panic!(
                "publish says it fetched the image again\n{}",
                show(&o, &up.log())
            )
        });
    assert!(publish_note.contains("\"publish\""), "{publish_note}");
    assert_eq!(delivered(&report), digest);
    assert_eq!(sha256_digest(&blob), digest);

    // The registry holds the right bytes under the tag.
    let manifest: serde_json::Value = serde_json::from_slice(&common::curl(&[
        "-m",
        "30",
        "-H",
        "Accept: application/vnd.oci.image.manifest.v1+json",
        &format!("http://{host}/v2/kiln/app/manifests/latest"),
    ]))
    .unwrap();
    assert_eq!(
        manifest["layers"][0]["digest"],
        digest.as_str(),
        "{manifest}"
    );
    let pulled = client.path().join("pulled");
    common::curl(&[
        "-m",
        "60",
        "-o",
        pulled.to_str().unwrap(),
        &format!("http://{host}/v2/kiln/app/blobs/{digest}"),
    ]);
    assert_eq!(sha256_digest(&pulled), digest);
}

#[test]
fn a_shared_record_whose_image_is_gone_everywhere_is_a_clean_miss() {
    let server = PrivateServer::start().unwrap();
    let url = server.url();
    let nats = Nats::connect(&url);
    let set = common::unique_hostname("gone");
    let args = ["--no-verify", "--set", &set];

    let first = own_blobs_home(None);
    let client = tempfile::tempdir().unwrap();
    let report = {
        let up = up(first.path(), &url, &[], client.path());
        let o = build_over(
            client.path(),
            &url,
            "recipes/minimal.yaml",
            &args,
            &client.path().join("1"),
        );
        assert!(o.status.success(), "{}", show(&o, &up.log()));
        json_report(&o)
    };
    let digest = delivered(&report);
    let record = step_record_key(&report, "disk");
    assert!(nats.stage_keys().contains(&record));

    // The image leaves the object store; the host that made it is gone.
    nats.delete_object(&digest);
    assert!(!nats.has_object(&digest));
    let second = own_blobs_home(None);
    let client = tempfile::tempdir().unwrap();
    let up = up(second.path(), &url, &[], client.path());
    let o = build_over(
        client.path(),
        &url,
        "recipes/minimal.yaml",
        &args,
        &client.path().join("2"),
    );
    assert!(o.status.success(), "{}", show(&o, &up.log()));
    let again = json_report(&o);
    let err = stderr(&o);
    assert!(
        err.contains(&format!(
            "the disk stage's record names blob {digest}, which is neither here nor in the \
             object store: forgetting the record and running the stage again"
        )),
        "{}",
        show(&o, &up.log())
    );
    let disk = again["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stage"] == "disk")
        .unwrap();
    assert_eq!(disk["cache"], "miss", "the disk stage ran again: {disk}");
    // The same inputs give the same image; it is in the object store again, and recorded.
    assert_eq!(delivered(&again), digest);
    assert!(nats.has_object(&digest));
    assert!(nats.stage_keys().contains(&record));
}

#[test]
fn buckets_deleted_while_a_worker_runs_are_made_again() {
    let server = PrivateServer::start().unwrap();
    let url = server.url();
    let nats = Nats::connect(&url);
    let home = own_blobs_home(None);
    let logs = tempfile::tempdir().unwrap();
    let up = up(home.path(), &url, &[], logs.path());
    let set = common::unique_hostname("buckets");
    let args = ["--no-verify", "--set", &set];
    let client = tempfile::tempdir().unwrap();
    let o = build_over(
        client.path(),
        &url,
        "recipes/minimal.yaml",
        &args,
        &client.path().join("1"),
    );
    assert!(o.status.success(), "{}", show(&o, &up.log()));
    let digest = delivered(&json_report(&o));

    nats.delete_stream("OBJ_kiln-blobs");
    nats.delete_stream("KV_kiln-stages");
    assert!(!nats.stream_exists("OBJ_kiln-blobs"));

    // The same build again, delivered to a client that has nothing: the image must come from the
    // object store, made again by the worker.
    let client = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let o = build_over(
        client.path(),
        &url,
        "recipes/minimal.yaml",
        &args,
        &client.path().join("2"),
    );
    assert!(o.status.success(), "{}", show(&o, &up.log()));
    eprintln!(
        "build after the buckets were deleted: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(delivered(&json_report(&o)), digest);
    assert!(nats.stream_exists("OBJ_kiln-blobs"));
    assert!(nats.stream_exists("KV_kiln-stages"));
    assert!(nats.has_object(&digest));
    let log = up.log();
    assert!(
        log.contains("the kiln-blobs object store bucket is gone: creating it again"),
        "{log}"
    );
    assert!(
        log.contains("the kiln-stages KV bucket is gone: creating it again"),
        "{log}"
    );
}

/// The step records a stage writes, by stage name.
fn steps_of(stage: &str) -> &'static [&'static str] {
    match stage {
        "rootfs" => &["packages", "rootfs"],
        "kernel" => &["kernel"],
        "disk" => &["disk"],
        "verify" => &["verify", "verified"],
        other => panic!("a full disk in the {other} stage: unexpected"),
    }
}

/// Temp files and directories (kiln's `.kiln-tmp-<pid>-…`, tempfile's `.tmp…`) under `dir`.
fn temp_entries(dir: &Path) -> Vec<PathBuf> {
    walk(dir)
        .into_iter()
        .flat_map(|p| {
            // `walk` lists files; a temp directory shows as one of its files' ancestors.
            p.ancestors()
                .take_while(|a| a.starts_with(dir) && *a != dir)
                .map(Path::to_path_buf)
                .collect::<Vec<_>>()
        })
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with(".kiln-tmp-") || n.starts_with(".tmp")
        })
        .collect()
}

#[test]
fn a_full_disk_is_reported_at_once_and_leaves_nothing_half_written() {
    let set = common::unique_hostname("full");
    // What the image must be: the same build on a disk with room.
    let roomy = own_blobs_home(None);
    let o = kiln(roomy.path())
        .args(["build", "recipes/minimal.yaml", "--no-bus", "--no-verify"])
        .args(["--set", &set, "--json", "-o"])
        .arg(roomy.path().join("out"))
        .output()
        .unwrap();
    let expected = delivered(&json_report(&o));

    let fs = Tmpfs::mount("12M");
    let home = own_blobs_home(Some(fs.path()));
    let home_text = home.path().display().to_string();

    // In process: the error names the place and the cause.
    let o = kiln(home.path())
        .args(["build", "recipes/minimal.yaml", "--no-bus", "--no-verify"])
        .args(["--set", &set, "-o"])
        .arg(home.path().join("out"))
        .output()
        .unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("no space left on device under {home_text}")),
        "{err}"
    );
    assert!(
        temp_entries(home.path()).is_empty(),
        "{:?}",
        temp_entries(home.path())
    );

    // A worker: one failed message of kind no_space on the first attempt, no retries.
    let server = PrivateServer::start().unwrap();
    let url = server.url();
    let nats = Nats::connect(&url);
    let client = tempfile::tempdir().unwrap();
    let up = up(
        home.path(),
        &url,
        &["--max-deliver", "4", "--ack-wait", "2"],
        client.path(),
    );
    let o = kiln(client.path())
        .args([
            "submit",
            "recipes/minimal.yaml",
            "--no-verify",
            "--follow",
            "--timeout",
            "600",
            "--json",
        ])
        .args(["--nats", &url, "--set", &set])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", show(&o, &up.log()));
    let events = json_lines(&o);
    let failed: Vec<&serde_json::Value> = events.iter().filter(|e| e["kind"] == "failed").collect();
    assert_eq!(failed.len(), 1, "{}", show(&o, &up.log()));
    let failed = failed[0];
    assert_eq!(failed["error"]["kind"], "no_space", "{failed}");
    assert_eq!(failed["attempts"], 1, "not retried: {failed}");
    let message = failed["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with(&format!("no space left on device under {home_text}")),
        "{message}"
    );
    assert!(
        !events.iter().any(|e| e["message"]
            .as_str()
            .is_some_and(|m| m.contains("retrying"))),
        "{}",
        show(&o, &up.log())
    );
    let stage = failed["stage"].as_str().unwrap();
    // Nothing half-written, and no record of the stage that failed (local or shared).
    assert!(
        temp_entries(home.path()).is_empty(),
        "{:?}",
        temp_entries(home.path())
    );
    let keys = nats.stage_keys();
    for step in steps_of(stage) {
        let dir = home.path().join("stages").join(step);
        assert!(walk(&dir).is_empty(), "{stage} recorded {:?}", walk(&dir));
        assert!(
            !keys.iter().any(|k| k.starts_with(&format!("{step}/"))),
            "{stage} recorded {keys:?}"
        );
    }

    // Space freed: the same build succeeds, with the image a roomy disk gives.
    fs.resize("1G");
    let o = build_over(
        client.path(),
        &url,
        "recipes/minimal.yaml",
        &["--no-verify", "--set", &set],
        &client.path().join("out"),
    );
    assert!(o.status.success(), "{}", show(&o, &up.log()));
    assert_eq!(delivered(&json_report(&o)), expected);
    drop(up);
}
