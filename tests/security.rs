//! The trust model, end to end against a real `nats-server` and real `kiln up` processes, as an
//! attacker with the rights of a submitter (publishing on NATS) would try it:
//! - a forged or replayed stage event is refused with `invalid_message` and nothing is signed;
//! - a request cannot name a machine profile file, a recipe or templates directory outside the
//!   worker's recipe roots, an overlong or taken build id, nor read kiln's credentials.

use kiln::bus::{Bus, PrivateServer, StageEvent};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

mod common;
use common::{Running, kiln, recipe_roots, rt, shared_home};

/// Publish raw bytes on `subject`, as any NATS client may.
fn publish(url: &str, subject: &str, payload: &[u8]) {
    rt().block_on(async {
        let bus = Bus::connect_url(url).await.unwrap();
        bus.ensure_kiln_stream().await.unwrap();
        bus.publish_raw(subject.to_string(), payload.to_vec())
            .await
            .unwrap();
    });
}

/// The events of `build` once one of them is a `failed` or the `publish` `completed`; every
/// event's raw JSON as well, to search for leaks.
fn wait_end(url: &str, build: &str, log: &Path) -> Vec<(StageEvent, String)> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let events: Vec<(StageEvent, String)> = rt().block_on(async {
            let bus = Bus::connect_url(url).await.unwrap();
            bus.stored_messages(&format!("kiln.build.{build}.>"))
                .await
                .unwrap()
                .into_iter()
                .filter_map(|m| {
                    let kind = kiln::bus::subjects::parse_stage_subject(&m.subject)?.kind;
                    let event = StageEvent::decode(kind, &m.payload).ok()?;
                    Some((event, String::from_utf8_lossy(&m.payload).into_owned()))
                })
                .collect()
        });
        let ended = events.iter().any(|(e, _)| match e {
            StageEvent::Failed(_) => true,
            StageEvent::Completed(c) => c.stage == kiln::bus::Stage::Publish,
            _ => false,
        });
        if ended {
            return events;
        }
        assert!(
            Instant::now() < deadline,
            "build {build} did not end; worker log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn failure(events: &[(StageEvent, String)]) -> &kiln::bus::StageFailed {
    events
        .iter()
        .find_map(|(e, _)| match e {
            StageEvent::Failed(f) => Some(f),
            _ => None,
        })
        .unwrap_or_else(|| {
            let kinds: Vec<String> = events
                .iter()
                .map(|(e, _)| format!("{} {:?}", e.stage(), e.kind()))
                .collect();
            panic!("no failed event among {kinds:?}")
        })
}

/// The builds the stream has events for whose id starts with `prefix`.
fn builds_named(url: &str, prefix: &str) -> Vec<String> {
    rt().block_on(async {
        let bus = Bus::connect_url(url).await.unwrap();
        let mut ids: Vec<String> = bus
            .stored_messages("kiln.build.*.*.*")
            .await
            .unwrap()
            .into_iter()
            .filter_map(|m| m.subject.split('.').nth(2).map(str::to_string))
            .filter(|b| b.starts_with(prefix))
            .collect();
        ids.sort();
        ids.dedup();
        ids
    })
}

fn request(id: Option<&str>, recipe: serde_json::Value) -> serde_json::Value {
    let mut r =
        serde_json::json!({ "v": 1, "recipe": recipe, "requester": "attacker", "verify": false });
    if let Some(id) = id {
        r["id"] = id.into();
    }
    r
}

#[test]
fn requests_cannot_reach_worker_files_profiles_secrets_or_taken_ids() {
    let server = PrivateServer::start().unwrap();
    let url = server.url();
    let home = shared_home();
    let work = tempfile::tempdir().unwrap();
    let roots = work.path().join("recipes");
    std::fs::create_dir_all(&roots).unwrap();
    // A host file a request must not reach, a profile file that would run QEMU with the
    // attacker's arguments, and a directory outside the roots.
    let outside = work.path().join("private");
    std::fs::create_dir_all(&outside).unwrap();
    let secret = outside.join("secret.yaml");
    std::fs::write(&secret, "name: hunter2-secret-content\nkernal: [\n").unwrap();
    let pwned = outside.join("pwned");
    let evil_profile = outside.join("evil.toml");
    std::fs::write(
        &evil_profile,
        format!(
            "boot = \"direct\"\nmachine = \"q35\"\nmemory_mib = 64\ncpus = 1\nextra_args = [\"-D\", \"{}\"]\n",
            pwned.display()
        ),
    )
    .unwrap();

    let log = work.path().join("up.log");
    let _up = Running::spawn(
        {
            let mut c = kiln(home.path());
            c.args(["up", "--nats", &url, "--listen", "none", "--recipes"])
                .arg(&roots)
                .args(["--allow-env", "CI_LABEL"])
                .env("KILN_API_TOKEN", "kiln-secret-token-value")
                .env("AWS_SECRET_ACCESS_KEY", "aws-secret-value")
                .env("CI_LABEL", "label-visible");
            c
        },
        &log,
    );

    // A profile file named in a request: refused, QEMU never runs it.
    let inline = serde_json::json!({ "inline": "name: x\n", "name": "x.yaml" });
    let mut r = request(Some("sec-profile"), inline.clone());
    r["profiles"] = serde_json::json!([evil_profile]);
    r["verify"] = true.into();
    publish(&url, "kiln.build.requested", r.to_string().as_bytes());
    let events = wait_end(&url, "sec-profile", &log);
    let f = failure(&events);
    assert_eq!(f.stage, kiln::bus::Stage::Source, "{f:?}");
    assert_eq!(f.error.kind, kiln::bus::ErrorKind::InvalidMessage, "{f:?}");
    assert!(
        f.error.message.contains("not a machine profile name"),
        "{f:?}"
    );
    assert!(!pwned.exists());

    // A recipe file outside the roots: refused without reading it; nothing of it in any event.
    let r = request(Some("sec-path"), serde_json::json!({ "path": secret }));
    publish(&url, "kiln.build.requested", r.to_string().as_bytes());
    let events = wait_end(&url, "sec-path", &log);
    let f = failure(&events);
    assert_eq!(f.error.kind, kiln::bus::ErrorKind::InvalidMessage, "{f:?}");
    assert!(
        f.error
            .message
            .contains("outside this worker's recipe roots"),
        "{f:?}"
    );
    for (_, raw) in &events {
        assert!(!raw.contains("hunter2"), "{raw}");
    }
    // The same through `..` and through a symbolic link inside the roots.
    std::os::unix::fs::symlink(&secret, roots.join("link.yaml")).unwrap();
    for (id, path) in [
        ("sec-dotdot", roots.join("../private/secret.yaml")),
        ("sec-link", roots.join("link.yaml")),
    ] {
        let r = request(Some(id), serde_json::json!({ "path": path }));
        publish(&url, "kiln.build.requested", r.to_string().as_bytes());
        let events = wait_end(&url, id, &log);
        assert!(
            failure(&events)
                .error
                .message
                .contains("outside this worker's recipe roots"),
            "{events:?}"
        );
        assert!(events.iter().all(|(_, raw)| !raw.contains("hunter2")));
    }
    // A templates directory outside the roots.
    std::fs::write(roots.join("ok.yaml"), "name: ok\n").unwrap();
    let mut r = request(
        Some("sec-templates"),
        serde_json::json!({ "path": roots.join("ok.yaml") }),
    );
    r["templates"] = serde_json::json!(outside);
    publish(&url, "kiln.build.requested", r.to_string().as_bytes());
    let events = wait_end(&url, "sec-templates", &log);
    assert!(
        failure(&events)
            .error
            .message
            .contains("templates directory"),
        "{events:?}"
    );

    // An overlong id and an id with a subject wildcard: refused under `invalid-<sequence>`,
    // nothing recorded under the id itself.
    let long = "a".repeat(300);
    for id in [long.as_str(), "x.>"] {
        publish(
            &url,
            "kiln.build.requested",
            request(Some(id), inline.clone()).to_string().as_bytes(),
        );
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while builds_named(&url, "invalid-").len() < 2 {
        assert!(
            Instant::now() < deadline,
            "{}",
            std::fs::read_to_string(&log).unwrap()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for id in builds_named(&url, "invalid-") {
        let f = failure(&wait_end(&url, &id, &log)).clone();
        assert!(f.error.message.contains("`id` must be 1 to 64"), "{f:?}");
    }
    assert!(builds_named(&url, "aaaa").is_empty());
    assert!(builds_named(&url, "x_").is_empty());

    // A taken id: the second request is refused and the first build's events stay its own.
    let env_recipe = "name: envtest\nenv:\n  KILN_API_TOKEN: unset-token\n  AWS_SECRET_ACCESS_KEY: unset-aws\n  CI_LABEL: unset-label\nparams:\n  token: \"{{ env.KILN_API_TOKEN }}\"\nrootfs:\n  hostname: \"{{ env.KILN_API_TOKEN }}-{{ env.AWS_SECRET_ACCESS_KEY }}-{{ env.CI_LABEL }}\"\nkernal: [\n";
    let r = request(
        Some("sec-dup"),
        serde_json::json!({ "inline": env_recipe, "name": "env.yaml" }),
    );
    publish(&url, "kiln.build.requested", r.to_string().as_bytes());
    let first = wait_end(&url, "sec-dup", &log);
    let before = first.len();
    publish(&url, "kiln.build.requested", r.to_string().as_bytes());
    let deadline = Instant::now() + Duration::from_secs(60);
    while builds_named(&url, "invalid-").len() < 3 {
        assert!(
            Instant::now() < deadline,
            "{}",
            std::fs::read_to_string(&log).unwrap()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let taken: Vec<_> = builds_named(&url, "invalid-")
        .into_iter()
        .map(|id| failure(&wait_end(&url, &id, &log)).error.message.clone())
        .filter(|m| m.contains("is taken"))
        .collect();
    assert_eq!(taken.len(), 1, "{taken:?}");
    assert_eq!(wait_end(&url, "sec-dup", &log).len(), before);

    // Secrets: the recipe (a render error, so its rendered text is shown) saw the defaults
    // of the credentials and the allowed variable's value.
    let text: String = first.iter().map(|(_, raw)| raw.as_str()).collect();
    assert!(!text.contains("kiln-secret-token-value"), "{text}");
    assert!(!text.contains("aws-secret-value"), "{text}");

    // --allow-env cannot open kiln's credentials.
    let o = kiln(home.path())
        .args([
            "up",
            "--nats",
            &url,
            "--listen",
            "none",
            "--allow-env",
            "KILN_API_TOKEN",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("cannot be opened to recipes"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn secrets_are_not_readable_and_allowed_variables_are() {
    // `kiln render` reads the caller's own environment, but never kiln's credentials.
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let recipe = dir.path().join("env.yaml");
    std::fs::write(
        &recipe,
        "name: envtest\nenv:\n  KILN_API_TOKEN: unset-token\n  KILN_NATS_PASSWORD: unset-nats\n  CI_LABEL: unset-label\nkernel:\n  package: linux-image-cloud-amd64\ndisk:\n  partitions:\n    - { name: root, type: root, size: auto }\nboot:\n  loader: none\nrootfs:\n  hostname: \"h-{{ env.CI_LABEL }}\"\n  files:\n    - path: /etc/leak\n      content: \"{{ env.KILN_API_TOKEN }} {{ env.KILN_NATS_PASSWORD }}\"\n",
    )
    .unwrap();
    let o = kiln(home.path())
        .args(["render", "--json"])
        .arg(&recipe)
        .env("KILN_API_TOKEN", "kiln-secret-token-value")
        .env("KILN_NATS_PASSWORD", "nats-secret-value")
        .env("CI_LABEL", "visible")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("unset-token unset-nats"), "{out}");
    assert!(out.contains("h-visible"), "{out}");
    assert!(!out.contains("secret-value"), "{out}");
}

/// A completed message of `stage` from `events`, as JSON.
fn completed(events: &[(StageEvent, String)], stage: &str) -> serde_json::Value {
    let raw = events
        .iter()
        .find(|(e, _)| matches!(e, StageEvent::Completed(c) if c.stage.name() == stage))
        .map(|(_, raw)| raw.clone())
        .unwrap_or_else(|| panic!("no {stage} completed"));
    serde_json::from_str(&raw).unwrap()
}

#[test]
fn forged_stage_events_are_refused_and_nothing_is_signed() {
    let server = PrivateServer::start().unwrap();
    let url = server.url();
    let home = shared_home();
    let work = tempfile::tempdir().unwrap();
    let key = work.path().join("images.key");
    common::keygen(home.path(), &key);
    let layout = work.path().join("layout");
    let log = work.path().join("up.log");
    let _up = Running::spawn(
        {
            let mut c = kiln(home.path());
            c.args(["up", "--nats", &url, "--listen", "none", "--key"])
                .arg(&key)
                .arg("--publish-to")
                .arg(format!("oci:{}", layout.display()))
                .args(recipe_roots());
            c
        },
        &log,
    );

    // A real build, booted and published.
    let o = kiln(home.path())
        .args([
            "submit",
            "recipes/app.yaml",
            "--profile",
            "direct",
            "--set",
            "release=security",
            "--json",
            "--follow",
            "--timeout",
            "600",
            "--nats",
            &url,
        ])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{}{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let id = String::from_utf8_lossy(&o.stdout)
        .lines()
        .next()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["build"].clone())
        .unwrap();
    let id = id.as_str().unwrap();
    let events = wait_end(&url, id, &log);
    let verified = completed(&events, "verify");
    let index = || std::fs::read_to_string(layout.join("index.json")).unwrap();
    let published = index();
    // The layout holds the signature and the three attestations too: kiln verify checks them.
    let o = kiln(home.path())
        .args([
            "verify",
            &format!("oci:{}:latest", layout.display()),
            "--json",
            "--key",
        ])
        .arg(work.path().join("images.key.pub"))
        .arg("--verifier-key")
        .arg(home.path().join("verifier.key.pub"))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for c in report["checks"].as_array().unwrap() {
        assert_eq!(c["status"], "verified", "{report}");
    }

    // Forgeries of verify.completed: a state digest that no worker recorded (a state whose disk
    // never booted, or whose recipe was changed, has another digest); the real state's digest
    // replayed under another build id; a digest that is not one.
    let mut never_booted = verified.clone();
    never_booted["state_digest"] = format!("sha256:{}", "ab".repeat(32)).into();
    let mut not_a_digest = verified.clone();
    not_a_digest["state_digest"] = "../../etc/passwd".into();
    let forgeries = [
        ("forged-disk", never_booted),
        ("forged-replay", verified.clone()),
        ("forged-digest", not_a_digest),
    ];
    for (forged, mut msg) in forgeries {
        msg["build"] = forged.into();
        msg["worker"] = "attacker".into();
        publish(
            &url,
            &format!("kiln.build.{forged}.verify.completed"),
            msg.to_string().as_bytes(),
        );
        let events = wait_end(&url, forged, &log);
        let f = failure(&events);
        assert_eq!(f.stage, kiln::bus::Stage::Publish, "{f:?}");
        assert_eq!(f.error.kind, kiln::bus::ErrorKind::InvalidMessage, "{f:?}");
        assert!(f.error.message.contains("no kiln worker recorded"), "{f:?}");
        assert!(
            !events
                .iter()
                .any(|(e, _)| matches!(e, StageEvent::Completed(c) if c.worker != "attacker")),
            "a worker completed a stage of {forged}"
        );
    }
    // Nothing new was pushed or signed, and no image was announced for the forgeries.
    assert_eq!(index(), published);
    let announced = rt().block_on(async {
        let bus = Bus::connect_url(&url).await.unwrap();
        bus.stored_messages("kiln.image.published.>").await.unwrap()
    });
    assert_eq!(announced.len(), 1, "{announced:?}");

    // A completed message of the wrong stage for its subject is refused too.
    let mut wrong = completed(&events, "kernel");
    wrong["build"] = "forged-stage".into();
    publish(
        &url,
        "kiln.build.forged-stage.verify.completed",
        wrong.to_string().as_bytes(),
    );
    let f = failure(&wait_end(&url, "forged-stage", &log)).clone();
    assert_eq!(f.error.kind, kiln::bus::ErrorKind::InvalidMessage, "{f:?}");
}

/// Pids of QEMU processes whose command line mentions `needle`.
fn qemus_with(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let text = String::from_utf8_lossy(&cmdline);
        if text.contains("qemu-system") && text.contains(needle) {
            out.push(pid);
        }
    }
    out
}

#[test]
fn sigterm_stops_a_busy_worker_within_seconds() {
    let server = PrivateServer::start().unwrap();
    let url = server.url();
    let home = shared_home();
    let work = tempfile::tempdir().unwrap();
    // An operator's profile whose guest never runs (`-S`: QEMU starts with the CPU stopped), so
    // the verify stage waits for its marker for minutes.
    let profiles = work.path().join("profiles");
    std::fs::create_dir_all(&profiles).unwrap();
    let direct = std::fs::read_to_string(common::root().join("qemu/direct.toml")).unwrap();
    let frozen = direct.replace("extra_args = [", "extra_args = [\"-S\", ");
    assert_ne!(frozen, direct);
    std::fs::write(profiles.join("frozen.toml"), frozen).unwrap();
    let log = work.path().join("up.log");
    let mut up = Running::spawn(
        {
            let mut c = kiln(home.path());
            c.args(["up", "--nats", &url, "--listen", "none", "--profiles"])
                .arg(&profiles)
                .args(recipe_roots());
            c
        },
        &log,
    );
    let o = kiln(home.path())
        .args([
            "submit",
            "recipes/minimal.yaml",
            "--profile",
            "frozen",
            "--json",
            "--nats",
            &url,
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Wait until the guest is "booting".
    let home_text = home.path().display().to_string();
    let deadline = Instant::now() + Duration::from_secs(300);
    while qemus_with(&home_text).is_empty() {
        assert!(
            Instant::now() < deadline,
            "no boot started: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(1));
    let stopping = Instant::now();
    // SAFETY: kill(2) with the pid of our own child.
    unsafe {
        libc::kill(up.pid() as i32, libc::SIGTERM);
    }
    let status = loop {
        if let Some(s) = up.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            stopping.elapsed() < Duration::from_secs(10),
            "kiln up still runs 10 s after SIGTERM: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!(
        "kiln up stopped {:.2} s after SIGTERM in the middle of a boot ({status})",
        stopping.elapsed().as_secs_f64()
    );
    // Its QEMU went with it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !qemus_with(&home_text).is_empty() {
        assert!(Instant::now() < deadline, "QEMU outlived kiln up");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_template_bomb_fails_in_bounded_time_while_other_builds_go_on() {
    let server = PrivateServer::start().unwrap();
    let url = server.url();
    let home = shared_home();
    let work = tempfile::tempdir().unwrap();
    let log = work.path().join("up.log");
    let _up = Running::spawn(
        {
            let mut c = kiln(home.path());
            c.args([
                "up",
                "--nats",
                &url,
                "--listen",
                "none",
                "--render-timeout",
                "3",
            ])
            .args(recipe_roots());
            c
        },
        &log,
    );
    // Lists that share their items, serialized: minijinja charges no fuel for the walk, so only
    // the render child's time and memory limits stop it.
    let bomb = "{% set a = [1, 1] %}".to_string()
        + &"{% set a = [a, a] %}".repeat(30)
        + "name: \"{{ a|tojson|length }}\"\n";
    let started = Instant::now();
    let r = request(
        Some("sec-bomb"),
        serde_json::json!({ "inline": bomb, "name": "bomb.yaml" }),
    );
    publish(&url, "kiln.build.requested", r.to_string().as_bytes());
    let good = request(
        Some("sec-good"),
        serde_json::json!({ "path": "recipes/minimal.yaml" }),
    );
    publish(&url, "kiln.build.requested", good.to_string().as_bytes());

    let events = wait_end(&url, "sec-bomb", &log);
    let f = failure(&events);
    let took = started.elapsed();
    assert_eq!(f.stage, kiln::bus::Stage::Render, "{f:?}");
    assert_eq!(f.error.kind, kiln::bus::ErrorKind::Recipe, "{f:?}");
    assert!(f.error.message.contains("limit"), "{f:?}");
    assert!(
        f.error.file.as_deref().unwrap_or("").ends_with("bomb.yaml"),
        "{f:?}"
    );
    assert!(took < Duration::from_secs(30), "the bomb took {took:?}");
    eprintln!("template bomb refused after {:.1} s", took.as_secs_f64());
    // The other build went on to the end.
    let events = wait_end(&url, "sec-good", &log);
    assert!(
        events.iter().any(|(e, _)| matches!(
            e,
            StageEvent::Completed(c) if c.stage == kiln::bus::Stage::Publish
        )),
        "{:?}",
        failure(&events)
    );
}
