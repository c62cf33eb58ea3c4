//! The web dashboard in a real browser: Debian's Chromium, headless, driven by Playwright
//! (tests/browser/dashboard.mjs, installed by .ci/setup) against `kiln up` on a real
//! nats-server, publishing to a real docker-registry. A build submitted through the API shows up
//! in the list running and then completed without a reload; its page has seven stage bars and
//! the serial console's marker line; a broken recipe submitted from the page (the token asked for
//! once) shows its file:line:column; the image's signature and attestations are verified; an
//! agent runs the image and a rollout moves it, both on the fleet page; the page makes no
//! request outside the kiln server. Screenshots of every page are kept in
//! `$CARGO_TARGET_TMPDIR/dashboard/`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

mod common;
use common::agents::{Agent, VmReaper};
use common::registry::start_registry;
use common::{kiln, root, shared_home};

const TOKEN: &str = "dashboard-test-token-0123456789";
const CHROMIUM: &str = "/usr/bin/chromium";
/// The agent the fleet page shows.
const AGENT: &str = "hv-dash";
/// Where .ci/setup installs playwright-core.
const BROWSER_MODULES: &str = "/var/tmp/kiln-test-tools/browser/node_modules";

/// The static files are what the server sends: the page, its script and style, each with a
/// policy that keeps the browser to this server.
#[test]
fn the_dashboard_is_served_from_the_binary_with_a_strict_policy() {
    let server = kiln::bus::PrivateServer::start().unwrap();
    let home = shared_home();
    let (_up, base) = common::up::kiln_up(home.path(), &server.url(), &[], Some(TOKEN), |_| {});
    for (path, kind, needle) in [
        ("/", "text/html", "/ui/app.js"),
        ("/builds/some-build", "text/html", "<main id=\"main\""),
        ("/images", "text/html", "Skip to content"),
        (
            "/ui/app.js",
            "text/javascript",
            "EventSource(\"/v1/events\")",
        ),
        ("/ui/app.css", "text/css", ".stage"),
        ("/ui/icon.svg", "image/svg+xml", "<svg"),
    ] {
        let out = common::curl(&["-sS", "-D", "-", &format!("{base}{path}")]);
        let text = String::from_utf8_lossy(&out).to_string();
        let (headers, body) = text.split_once("\r\n\r\n").unwrap();
        let headers = headers.to_ascii_lowercase();
        assert!(headers.starts_with("http/1.1 200"), "{path}: {headers}");
        assert!(
            headers.contains(&format!("content-type: {kind}")),
            "{path}: {headers}"
        );
        assert!(
            headers.contains("content-security-policy: default-src 'none'; script-src 'self'"),
            "{path}: {headers}"
        );
        assert!(body.contains(needle), "{path}: {body}");
        // Nothing is fetched from anywhere else: no absolute URL in the assets.
        for scheme in ["http://", "https://", "//cdn", "@import"] {
            assert!(
                !body.contains(scheme) || kind == "image/svg+xml",
                "{path} names {scheme}: {body}"
            );
        }
    }
    // The views answer without a token, and the live stream is an event stream.
    for path in ["/v1/images", "/v1/farm"] {
        let out = common::curl(&["-sS", "-f", &format!("{base}{path}")]);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert!(v.is_object(), "{path}: {v}");
    }
    // It stays open (curl gives up after 2 s), after its headers and a first comment.
    let out = Command::new("curl")
        .args(["-sS", "-m", "2", "-D", "-", &format!("{base}/v1/events")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    assert!(text.contains(": kiln events"), "{text}");
    assert!(text.contains("content-type: text/event-stream"), "{text}");
    let r = reqwest::blocking::get(format!("{base}/v1/images/verify?ref=nothing")).unwrap();
    assert_eq!(r.status(), 400);
    let v: serde_json::Value = serde_json::from_slice(&r.bytes().unwrap()).unwrap();
    assert_eq!(v["error"]["field"], "ref", "{v}");
    // An image nobody announced, on another host: refused, nothing is fetched.
    let elsewhere = format!(
        "127.0.0.1:{}/x@sha256:{}",
        common::free_port(),
        "0".repeat(64)
    );
    let r = reqwest::blocking::get(format!(
        "{base}/v1/images/verify?ref={}",
        kiln::net::percent_encode(&elsewhere)
    ))
    .unwrap();
    assert_eq!(r.status(), 404);
}

#[test]
fn the_dashboard_shows_builds_live_images_and_failures_in_a_real_browser() {
    for (what, path) in [("Chromium", CHROMIUM), ("playwright-core", BROWSER_MODULES)] {
        assert!(
            Path::new(path).exists(),
            "{what} is not at {path}: run .ci/setup, which installs it"
        );
    }
    let home = shared_home();
    let work = tempfile::tempdir().unwrap();
    let artifacts = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    let _ = std::fs::remove_dir_all(&artifacts);
    std::fs::create_dir_all(&artifacts).unwrap();

    let reg = start_registry(None);
    let host = format!("127.0.0.1:{}", reg.port);
    let server = kiln::bus::PrivateServer::start().unwrap();
    let key = work.path().join("images.key");
    common::keygen(home.path(), &key);
    let key_arg = key.display().to_string();
    let (up, base) = common::up::kiln_up(
        home.path(),
        &server.url(),
        &["--publish-to", &host, "--key", &key_arg],
        Some(TOKEN),
        |_| {},
    );

    // An agent in group `web` that runs what `kiln/app:latest` becomes (the fleet page's host).
    let state = work.path().join("hv-dash");
    let _reaper = VmReaper(state.clone());
    let verifier = home.path().join("verifier.key.pub");
    let mut c = kiln(home.path());
    c.args(["agent", "--nats", &server.url(), "--name", AGENT, "--json"])
        .args([
            "--watch",
            &format!("{host}/kiln/app:latest"),
            "--group",
            "web",
        ])
        .args(["--profile", "direct", "--heartbeat-interval", "1"])
        .args(["--listen", &format!("127.0.0.1:{}", common::free_port())])
        .arg("--trust")
        .arg(work.path().join("images.key.pub"))
        .arg("--trust-verifier")
        .arg(&verifier)
        .arg("--state-dir")
        .arg(&state);
    let agent = Agent::start(c, &work.path().join("agent.log"));
    agent.next("ready", Duration::from_secs(60));

    // A recipe whose third line is an unknown field (the recipe roots include the temp dir).
    let broken = work.path().join("broken.yaml");
    std::fs::write(&broken, "name: broken\nversion: \"1\"\nkernal: x\n").unwrap();

    let out = Command::new("node")
        .arg(root().join("tests/browser/dashboard.mjs"))
        .env("KILN_URL", &base)
        .env("KILN_TOKEN", TOKEN)
        .env("KILN_APP", root().join("recipes/app.yaml"))
        .env("KILN_BROKEN", &broken)
        .env("KILN_BROKEN_AT", "broken.yaml:3:1")
        .env("KILN_MARKER", "kiln-boot-ok")
        .env("KILN_ARTIFACTS", &artifacts)
        .env("KILN_BROWSER_MODULES", BROWSER_MODULES)
        .env("KILN_CHROMIUM", CHROMIUM)
        .env("KILN_AGENT", AGENT)
        .env("KILN_NATS", server.url())
        .env("KILN_BIN", env!("CARGO_BIN_EXE_kiln"))
        .env("KILN_HOME", home.path())
        .output()
        .expect("node runs (installed by .ci/setup)");
    let report = format!(
        "stdout:\n{}\nstderr:\n{}\nkiln up:\n{}\nagent:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        up.log(),
        std::fs::read_to_string(work.path().join("agent.log")).unwrap_or_default()
    );
    assert!(out.status.success(), "{report}");
    println!("{report}");

    // The screenshots are PNG files, kept for people to look at.
    for name in [
        "builds-running",
        "build",
        "build-failed",
        "builds",
        "images",
        "fleet",
        "farm",
    ] {
        let path = artifacts.join(format!("{name}.png"));
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 10_000,
            "{} is not a screenshot",
            path.display()
        );
    }
    let outside: Vec<String> =
        serde_json::from_slice(&std::fs::read(artifacts.join("outside-requests.json")).unwrap())
            .unwrap();
    assert!(outside.is_empty(), "requests outside kiln: {outside:?}");
    println!("screenshots in {}", artifacts.display());
}
