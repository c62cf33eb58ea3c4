//! kiln's HTTP front end and `kiln watch`, end to end: a real private `nats-server`, a real
//! `kiln up` process serving the API on a free loopback port, real git repositories made with
//! git2, reqwest as the client, real builds (package downloads shared with other test runs
//! through `/var/tmp/kiln-test-cache`) and a real QEMU boot.

use git2::{Repository, RepositoryInitOptions};
use kiln::bus::PrivateServer;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::up::Lines;
use common::{Running, commit_all, copy_dir, kiln, root, shared_home};

const TOKEN: &str = "test-token-0123456789abcdef";

/// `kiln up` with the API on a free loopback port (the token in `$KILN_API_TOKEN` when
/// `env_token`); returns the process and the API's base URL.
fn kiln_up(home: &Path, nats: &str, extra: &[&str], env_token: bool) -> (Lines, String) {
    kiln_up_with(home, nats, extra, env_token, |_| {})
}

/// [`kiln_up`], with `customize` applied to the command before it starts.
fn kiln_up_with(
    home: &Path,
    nats: &str,
    extra: &[&str],
    env_token: bool,
    customize: impl FnOnce(&mut Command),
) -> (Lines, String) {
    common::up::kiln_up(home, nats, extra, env_token.then_some(TOKEN), customize)
}

/// JSON bodies without reqwest's `json` feature.
trait JsonBody {
    fn json_body(self, v: &serde_json::Value) -> Self;
}

impl JsonBody for reqwest::blocking::RequestBuilder {
    fn json_body(self, v: &serde_json::Value) -> Self {
        self.header("content-type", "application/json")
            .body(serde_json::to_vec(v).unwrap())
    }
}

trait JsonReply {
    fn json_value(self) -> serde_json::Value;
}

impl JsonReply for reqwest::blocking::Response {
    fn json_value(self) -> serde_json::Value {
        let bytes = self.bytes().unwrap();
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&bytes)))
    }
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(None)
        .build()
        .unwrap()
}

/// Every `kiln.build.requested` message in the stream.
fn requests(nats: &str) -> Vec<serde_json::Value> {
    use async_nats::jetstream::consumer;
    use futures::StreamExt;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let bus = kiln::bus::Bus::connect_url(nats).await.unwrap();
        let stream = bus.ensure_kiln_stream().await.unwrap();
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: "kiln.build.requested".into(),
                deliver_policy: consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .unwrap();
        let mut out = Vec::new();
        if consumer.cached_info().num_pending == 0 {
            return out;
        }
        let mut messages = consumer.messages().await.unwrap();
        while let Some(m) = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .unwrap()
        {
            let m = m.unwrap();
            out.push(serde_json::from_slice(&m.payload).unwrap());
            if m.info().unwrap().pending == 0 {
                break;
            }
        }
        out
    })
}

/// Poll `GET /v1/builds/{id}` until the build ends; returns its status.
fn wait_for_end(
    http: &reqwest::blocking::Client,
    base: &str,
    id: &str,
    up: &Lines,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        assert!(
            Instant::now() < deadline,
            "build {id} did not end\n{}",
            up.log()
        );
        let r = http.get(format!("{base}/v1/builds/{id}")).send().unwrap();
        assert_eq!(r.status(), 200, "build {id}");
        let s: serde_json::Value = r.json_value();
        if s["state"] == "completed" || s["state"] == "failed" {
            return s;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Server-sent events as (event, id, data), until the server ends the stream.
fn read_sse(r: reqwest::blocking::Response) -> Vec<(String, u64, serde_json::Value, Instant)> {
    let mut out = Vec::new();
    let (mut event, mut id, mut data) = (String::new(), 0u64, String::new());
    for line in BufReader::new(r).lines() {
        let line = line.unwrap();
        if line.is_empty() {
            if !data.is_empty() {
                out.push((
                    std::mem::take(&mut event),
                    id,
                    serde_json::from_str(&data).unwrap(),
                    Instant::now(),
                ));
                data.clear();
            }
            continue;
        }
        if let Some(v) = line.strip_prefix("event:") {
            event = v.trim().to_string();
        } else if let Some(v) = line.strip_prefix("id:") {
            id = v.trim().parse().unwrap();
        } else if let Some(v) = line.strip_prefix("data:") {
            data.push_str(v.trim_start());
        }
    }
    out
}

#[test]
fn api_builds_reports_and_streams_and_refuses_what_it_must() {
    let server = PrivateServer::start().unwrap();
    let nats = server.url();
    let home = shared_home();
    let (up, base) = kiln_up(home.path(), &nats, &[], true);
    let http = client();
    let body = serde_json::json!({
        "v": 1,
        "recipe": { "path": root().join("recipes/minimal.yaml") },
        "requester": "api-test",
        "profiles": ["direct"],
        // A slow TCG guest on a busy host can fail the kernel's timer check and panic.
        "params": { "console": "ttyS0 no_timer_check" },
    });

    // No token, a wrong token, another scheme: 401 with WWW-Authenticate, nothing published.
    for auth in [None, Some("Bearer wrong-token"), Some("Basic dXNlcjpwYXNz")] {
        let mut req = http.post(format!("{base}/v1/builds")).json_body(&body);
        if let Some(a) = auth {
            req = req.header("Authorization", a);
        }
        let r = req.send().unwrap();
        assert_eq!(r.status(), 401, "{auth:?}");
        let challenge = r.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .to_string();
        assert!(challenge.starts_with("Bearer"), "{challenge}");
        let e: serde_json::Value = r.json_value();
        assert_eq!(e["error"]["kind"], "unauthorized", "{e}");
    }
    let r = http
        .post(format!("{base}/v1/hooks/git"))
        .json_body(&serde_json::json!({"repo": "/tmp", "ref": "main"}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(requests(&nats).is_empty(), "a refused POST published");

    // A bad body: 400 naming the field; still nothing published.
    let bad = serde_json::json!({ "v": 1, "recipe": { "inline": "name: x\n" }, "requester": "t" });
    let r = http
        .post(format!("{base}/v1/builds"))
        .bearer_auth(TOKEN)
        .json_body(&bad)
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
    let e: serde_json::Value = r.json_value();
    assert_eq!(e["error"]["kind"], "invalid_request", "{e}");
    assert_eq!(e["error"]["field"], "recipe.name", "{e}");
    let r = http
        .post(format!("{base}/v1/builds"))
        .bearer_auth(TOKEN)
        .json_body(&serde_json::json!({ "v": 1, "recipe": { "path": "r.yaml" } }))
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
    let e: serde_json::Value = r.json_value();
    assert_eq!(e["error"]["field"], "requester", "{e}");
    assert!(requests(&nats).is_empty());

    // Unknown build: 404 for status and events.
    for path in [
        "/v1/builds/no-such-build",
        "/v1/builds/no-such-build/events",
    ] {
        let r = http.get(format!("{base}{path}")).send().unwrap();
        assert_eq!(r.status(), 404, "{path}");
        let e: serde_json::Value = r.json_value();
        assert_eq!(e["error"]["kind"], "not_found", "{e}");
    }

    // A build: 202, then its events live over SSE until the final one.
    let posted = Instant::now();
    let r = http
        .post(format!("{base}/v1/builds"))
        .bearer_auth(TOKEN)
        .json_body(&body)
        .send()
        .unwrap();
    assert_eq!(r.status(), 202);
    eprintln!(
        "POST /v1/builds answered in {:.1} ms",
        posted.elapsed().as_secs_f64() * 1000.0
    );
    let accepted: serde_json::Value = r.json_value();
    let id = accepted["build"].as_str().unwrap().to_string();
    assert_eq!(accepted["status_url"], format!("{base}/v1/builds/{id}"));
    assert_eq!(
        accepted["events_url"],
        format!("{base}/v1/builds/{id}/events")
    );
    let requested = requests(&nats);
    assert_eq!(requested.len(), 1, "{requested:?}");
    assert_eq!(requested[0]["id"], id.as_str());
    assert_eq!(requested[0]["requester"], "api-test");
    let connected = Instant::now();
    let r = http
        .get(accepted["events_url"].as_str().unwrap())
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let events = read_sse(r);
    assert!(!events.is_empty(), "{}", up.log());
    eprintln!(
        "build through the API (direct boot): {:.1} s from POST to the final event",
        events
            .last()
            .unwrap()
            .3
            .duration_since(posted)
            .as_secs_f64()
    );
    // In stream order, every one of this build, ending with verify's completed.
    let ids: Vec<u64> = events.iter().map(|e| e.1).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    for (name, _, data, _) in &events {
        assert!(
            ["started", "progress", "completed", "failed"].contains(&name.as_str()),
            "{name}"
        );
        assert_eq!(data["build"], id.as_str());
    }
    let (last_name, _, last, last_at) = events.last().unwrap();
    assert_eq!(
        (last_name.as_str(), &last["stage"]),
        ("completed", &serde_json::json!("publish")),
        "{last}"
    );
    let verified = events
        .iter()
        .find(|e| e.0 == "completed" && e.2["stage"] == "verify")
        .map(|e| &e.2)
        .expect("a verify completed event");
    assert!(
        verified["outputs"]["verify.direct"]["marker_line"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{verified}"
    );
    let order: Vec<&str> = events
        .iter()
        .filter(|e| e.0 == "completed")
        .map(|e| e.2["stage"].as_str().unwrap())
        .collect();
    assert_eq!(
        order,
        [
            "source", "render", "rootfs", "kernel", "disk", "verify", "publish"
        ]
    );
    // Live: the build (with a boot) took seconds after the stream opened, and the events came
    // as they happened, not all at the end.
    let first_at = events[0].3;
    assert!(
        last_at.duration_since(first_at) > Duration::from_secs(1),
        "events arrived at once: {:?} after connecting",
        last_at.duration_since(connected)
    );

    // Status: every stage with its worker and cache.
    let r = http.get(format!("{base}/v1/builds/{id}")).send().unwrap();
    assert_eq!(r.status(), 200);
    let status: serde_json::Value = r.json_value();
    assert_eq!(status["state"], "completed", "{status}");
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
        assert!(s["duration_ms"].is_u64(), "{s}");
    }
    // `kiln status --json` says the same.
    let o = kiln(home.path())
        .args(["status", &id, "--json", "--nats", &nats])
        .output()
        .unwrap();
    assert!(o.status.success());
    let cli: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(cli, status);

    // An id that is taken: 409, nothing published.
    let mut again_body = body.clone();
    again_body["id"] = serde_json::json!(id);
    let r = http
        .post(format!("{base}/v1/builds"))
        .bearer_auth(TOKEN)
        .json_body(&again_body)
        .send()
        .unwrap();
    assert_eq!(r.status(), 409);
    assert_eq!(r.json_value()["error"]["field"], "id");
    assert_eq!(requests(&nats).len(), 1);

    // The events of an ended build: replayed, then the stream ends.
    let r = http
        .get(format!("{base}/v1/builds/{id}/events"))
        .send()
        .unwrap();
    let again = read_sse(r);
    assert_eq!(
        again.iter().map(|e| e.1).collect::<Vec<_>>(),
        ids,
        "a replay gives the same events"
    );

    // Recent builds from the build index: a build that fails at render is listed first, with
    // its error, then the completed one with its image; `limit` bounds the list.
    let bad_recipe = serde_json::json!({
        "v": 1,
        "recipe": { "inline": "name: bad\nversion: \"1\"\nkernal: x\n", "name": "bad.yaml" },
        "requester": "api-test-2",
    });
    let r = http
        .post(format!("{base}/v1/builds"))
        .bearer_auth(TOKEN)
        .json_body(&bad_recipe)
        .send()
        .unwrap();
    assert_eq!(r.status(), 202);
    let bad_id = r.json_value()["build"].as_str().unwrap().to_string();
    assert_eq!(wait_for_end(&http, &base, &bad_id, &up)["state"], "failed");
    let r = http.get(format!("{base}/v1/builds")).send().unwrap();
    assert_eq!(r.status(), 200);
    let list: serde_json::Value = r.json_value();
    let builds = list["builds"].as_array().unwrap();
    assert_eq!(builds.len(), 2, "{list}");
    assert_eq!(
        (&builds[0]["id"], &builds[0]["state"], &builds[0]["stage"]),
        (&bad_id.as_str().into(), &"failed".into(), &"render".into()),
        "{list}"
    );
    assert_eq!(builds[0]["error"]["kind"], "recipe", "{list}");
    assert_eq!(builds[0]["recipe"], "bad.yaml (inline)", "{list}");
    assert_eq!(builds[0]["requester"], "api-test-2", "{list}");
    assert_eq!(
        (&builds[1]["id"], &builds[1]["state"], &builds[1]["stage"]),
        (&id.as_str().into(), &"completed".into(), &"publish".into()),
        "{list}"
    );
    assert!(
        builds[1]["image"]
            .as_str()
            .is_some_and(|d| d.starts_with("sha256:") && d.len() == 71),
        "{list}"
    );
    let r = http
        .get(format!("{base}/v1/builds?limit=1"))
        .send()
        .unwrap();
    let one: serde_json::Value = r.json_value();
    assert_eq!(one["builds"].as_array().unwrap()[..], builds[..1], "{one}");
    let r = http
        .get(format!("{base}/v1/builds?limit=0"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json_value()["error"]["field"], "limit");
    // `kiln status --json` lists the same.
    let o = kiln(home.path())
        .args(["status", "--json", "--nats", &nats])
        .output()
        .unwrap();
    assert!(o.status.success());
    let cli: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(cli, list);
    drop(up);
}

const T1: i64 = 1_700_000_000;

/// A recipe repository on branch `main`: `recipes/a.yaml` and `recipes/b.yaml` (the minimal
/// recipe, booted directly), the crate's templates, a README; one commit.
struct RecipeRepo {
    _tmp: tempfile::TempDir,
    work: PathBuf,
    repo: Repository,
    time: i64,
}

impl RecipeRepo {
    fn new() -> RecipeRepo {
        let tmp = tempfile::tempdir().unwrap();
        let work = tmp.path().join("images");
        let mut opts = RepositoryInitOptions::new();
        opts.initial_head("main");
        let repo = Repository::init_opts(&work, &opts).unwrap();
        copy_dir(&root().join("templates"), &work.join("templates"));
        let minimal = std::fs::read_to_string(root().join("recipes/minimal.yaml")).unwrap();
        // Booted directly; `no_timer_check`: a slow TCG guest on a busy host can fail the
        // kernel's timer check and panic.
        let direct = minimal
            .replace("profile: uefi", "profile: direct")
            .replace(" quiet\"", " quiet no_timer_check\"");
        assert!(direct.contains("no_timer_check") && direct.contains("profile: direct"));
        std::fs::create_dir_all(work.join("recipes")).unwrap();
        for name in ["a", "b"] {
            let text = direct.replace("name: minimal\n", &format!("name: {name}\n"));
            std::fs::write(work.join(format!("recipes/{name}.yaml")), text).unwrap();
        }
        std::fs::write(work.join("README"), "images\n").unwrap();
        let mut r = RecipeRepo {
            _tmp: tmp,
            work,
            repo,
            time: T1,
        };
        r.commit("first");
        r
    }

    fn commit(&mut self, message: &str) -> String {
        self.time += 10;
        commit_all(&self.repo, message, self.time)
    }

    /// Change recipe `name`'s hostname parameter and commit.
    fn change(&mut self, name: &str, hostname: &str) -> String {
        let path = self.work.join(format!("recipes/{name}.yaml"));
        let text = std::fs::read_to_string(&path).unwrap();
        let changed = text
            .lines()
            .map(|l| {
                if l.trim_start().starts_with("hostname: kiln") {
                    format!("  hostname: {hostname}")
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
            + "\n";
        assert_ne!(changed, text);
        std::fs::write(&path, changed).unwrap();
        self.commit(&format!("{name}: hostname {hostname}"))
    }

    fn url(&self) -> String {
        self.work.display().to_string()
    }
}

#[test]
fn git_push_hooks_build_the_changed_recipe_at_the_pushed_commit() {
    let server = PrivateServer::start().unwrap();
    let nats = server.url();
    let home = shared_home();
    let mut repo = RecipeRepo::new();
    let (up, base) = kiln_up(
        home.path(),
        &nats,
        &[
            "--hook-repo",
            &repo.url(),
            "--hook-recipes",
            "recipes/*.yaml",
        ],
        false,
    );
    // No token given: kiln generated one, 0600, and said where.
    let token_file = home.path().join("api-token");
    let token = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_string();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(
        up.log().contains(&token_file.display().to_string()),
        "{}",
        up.log()
    );
    let http = client();
    let hook = |headers: &[(&str, &str)], body: &serde_json::Value| {
        let mut req = http
            .post(format!("{base}/v1/hooks/git"))
            .bearer_auth(&token)
            .json_body(body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.send().unwrap()
    };

    // A repository outside the allow-list: 403, nothing cloned, nothing published.
    let other = RecipeRepo::new();
    let r = hook(
        &[],
        &serde_json::json!({ "repo": other.url(), "ref": "main" }),
    );
    assert_eq!(r.status(), 403);
    let e: serde_json::Value = r.json_value();
    assert_eq!(e["error"]["kind"], "forbidden", "{e}");
    let r = hook(
        &[("X-GitHub-Event", "push")],
        &serde_json::json!({
            "ref": "refs/heads/main",
            "after": "0123456789abcdef0123456789abcdef01234567",
            "repository": { "clone_url": "https://evil.example.org/x.git" }
        }),
    );
    assert_eq!(r.status(), 403);
    assert!(requests(&nats).is_empty());
    assert!(
        !home.path().join("git").exists(),
        "a refused hook cloned something"
    );

    // GitHub's push payload after a commit that changes recipe a: one build, of a, at it.
    let before = repo
        .repo
        .head()
        .unwrap()
        .peel_to_commit()
        .unwrap()
        .id()
        .to_string();
    let c2 = repo.change("a", "kiln-a2");
    let github = serde_json::json!({
        "ref": "refs/heads/main",
        "before": before,
        "after": c2,
        "repository": { "clone_url": repo.url(), "full_name": "team/images" },
        "pusher": { "name": "alice" }
    });
    let pushed = Instant::now();
    let r = hook(&[("X-GitHub-Event", "push")], &github);
    assert_eq!(r.status(), 202);
    eprintln!(
        "first GitHub push hook (clone, checkout of two commits, recipes loaded) answered in {:.0} ms",
        pushed.elapsed().as_secs_f64() * 1000.0
    );
    let out: serde_json::Value = r.json_value();
    assert_eq!(out["commit"], c2.as_str(), "{out}");
    let builds = out["builds"].as_array().unwrap();
    assert_eq!(builds.len(), 1, "{out}");
    assert_eq!(builds[0]["recipe"], "recipes/a.yaml");
    let build_a = builds[0]["build"].as_str().unwrap().to_string();

    // The same delivery again builds nothing.
    let r = hook(&[("X-GitHub-Event", "push")], &github);
    assert_eq!(r.status(), 200);
    let out: serde_json::Value = r.json_value();
    assert!(out["builds"].as_array().unwrap().is_empty(), "{out}");

    // A README-only commit then a change of b, announced with the generic payload: b only.
    std::fs::write(repo.work.join("README"), "more words\n").unwrap();
    repo.commit("docs");
    let c4 = repo.change("b", "kiln-b2");
    let pushed = Instant::now();
    let r = hook(
        &[],
        &serde_json::json!({ "repo": repo.url(), "ref": "refs/heads/main", "commit": c4 }),
    );
    assert_eq!(r.status(), 202);
    eprintln!(
        "later generic push hook (fetch, checkout, recipes loaded) answered in {:.0} ms",
        pushed.elapsed().as_secs_f64() * 1000.0
    );
    let out: serde_json::Value = r.json_value();
    let builds = out["builds"].as_array().unwrap();
    assert_eq!(builds.len(), 1, "{out}");
    assert_eq!(builds[0]["recipe"], "recipes/b.yaml");
    assert_eq!(builds[0]["commit"], c4.as_str());
    let build_b = builds[0]["build"].as_str().unwrap().to_string();

    // A commit of another branch, announced as main's: refused, nothing published.
    let c5 = repo.change("a", "kiln-side");
    let side = repo
        .repo
        .find_commit(git2::Oid::from_str(&c5).unwrap())
        .unwrap();
    repo.repo.branch("side", &side, false).unwrap();
    let c4_commit = repo
        .repo
        .find_commit(git2::Oid::from_str(&c4).unwrap())
        .unwrap();
    repo.repo
        .reset(c4_commit.as_object(), git2::ResetType::Hard, None)
        .unwrap();
    let r = hook(
        &[],
        &serde_json::json!({ "repo": repo.url(), "ref": "refs/heads/main", "commit": c5 }),
    );
    assert_eq!(r.status(), 422);
    let e: serde_json::Value = r.json_value();
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("is not on refs/heads/main"),
        "{e}"
    );

    // Both requests name the recipe at its commit; both builds run to the end at that commit.
    let requested = requests(&nats);
    assert_eq!(requested.len(), 2, "{requested:?}");
    assert_eq!(requested[0]["recipe"]["git"]["ref"], c2.as_str());
    assert_eq!(requested[0]["recipe"]["git"]["path"], "recipes/a.yaml");
    assert_eq!(requested[1]["recipe"]["git"]["ref"], c4.as_str());
    for (id, commit) in [(&build_a, &c2), (&build_b, &c4)] {
        let status = wait_for_end(&http, &base, id, &up);
        assert_eq!(status["state"], "completed", "{status}\n{}", up.log());
        assert_eq!(status["commit"], commit.as_str(), "{status}");
        // The commit is in the source stage's message itself.
        let events = read_sse(
            http.get(format!("{base}/v1/builds/{id}/events"))
                .send()
                .unwrap(),
        );
        let source = events
            .iter()
            .find(|e| e.0 == "completed" && e.2["stage"] == "source")
            .unwrap();
        assert_eq!(source.2["outputs"]["commit"], commit.as_str());
    }
    drop(up);
}

#[test]
fn kiln_watch_submits_one_build_for_the_changed_recipe() {
    let server = PrivateServer::start().unwrap();
    let nats = server.url();
    let home = shared_home();
    let mut repo = RecipeRepo::new();
    let repo_url = repo.url();
    let (up, base) = kiln_up(home.path(), &nats, &["--allow-git", &repo_url], true);
    let watch = |extra: &[&str]| {
        let mut c = kiln(home.path());
        c.args([
            "watch",
            "--nats",
            &nats,
            "--repo",
            &repo_url,
            "--ref",
            "main",
            "--recipes",
            "recipes/*.yaml",
            "--json",
            "--no-verify",
        ])
        .args(extra);
        c
    };

    // Start from the current commit: nothing to build.
    let o = watch(&["--baseline", "--once"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        o.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(requests(&nats).is_empty());

    // A commit changing a: the running watcher submits exactly one build, of a, at that commit.
    let w = Lines::spawn(watch(&["--interval", "1"]), &home.path().join("watch.log"));
    std::thread::sleep(Duration::from_secs(2));
    let c2 = repo.change("a", "kiln-watched");
    let committed = Instant::now();
    let line = w
        .line(Duration::from_secs(60))
        .unwrap_or_else(|| panic!("kiln watch submitted nothing\n{}", w.log()));
    eprintln!(
        "kiln watch --interval 1 submitted the build {:.2} s after the commit",
        committed.elapsed().as_secs_f64()
    );
    let sub: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(sub["recipe"], "recipes/a.yaml", "{sub}");
    assert_eq!(sub["commit"], c2.as_str(), "{sub}");
    // A README-only commit: nothing more.
    std::fs::write(repo.work.join("README"), "changed\n").unwrap();
    repo.commit("docs");
    assert_eq!(w.line(Duration::from_secs(4)), None, "{}", w.log());
    let requested = requests(&nats);
    assert_eq!(requested.len(), 1, "{requested:?}");
    assert_eq!(requested[0]["id"], sub["build"]);
    assert_eq!(requested[0]["recipe"]["git"]["path"], "recipes/a.yaml");
    assert_eq!(requested[0]["recipe"]["git"]["ref"], c2.as_str());
    assert_eq!(requested[0]["verify"], false);
    drop(w);

    // The build runs through the workers of `kiln up` at that commit.
    let http = client();
    let status = wait_for_end(&http, &base, sub["build"].as_str().unwrap(), &up);
    assert_eq!(status["state"], "completed", "{status}\n{}", up.log());
    assert_eq!(status["commit"], c2.as_str());

    // The state survives: another run with nothing new submits nothing.
    let o = watch(&["--once"]).output().unwrap();
    assert!(o.status.success());
    assert!(
        o.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
}

/// `host:port` of an API base URL.
fn addr_of(base: &str) -> String {
    base.trim_start_matches("http://").to_string()
}

/// Send `bytes` on a new connection and read until the server closes it; returns what it sent
/// and how long it took to close (panics after 30 s).
fn send_and_wait_for_close(base: &str, bytes: &[u8]) -> (String, Duration) {
    let mut s = std::net::TcpStream::connect(addr_of(base)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(bytes).unwrap();
    let start = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the server did not close the connection: {e}"),
        }
    }
    (String::from_utf8_lossy(&out).into_owned(), start.elapsed())
}

/// The JSON body of a raw HTTP response.
fn raw_json(response: &str) -> serde_json::Value {
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {response}"))
}

/// An open `GET /v1/builds/{id}/events` connection and the status line it got.
fn follow_raw(base: &str, id: &str) -> (std::net::TcpStream, String) {
    let mut s = std::net::TcpStream::connect(addr_of(base)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /v1/builds/{id}/events HTTP/1.1\r\nHost: kiln\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let status = head.lines().next().unwrap_or_default().to_string();
    (s, status)
}

#[test]
fn slow_large_and_greedy_clients_are_bounded() {
    let server = PrivateServer::start().unwrap();
    let nats = server.url();
    let home = tempfile::tempdir().unwrap();
    let (up, base) = kiln_up(home.path(), &nats, &["--api-read-timeout", "2"], true);

    // Half a request's headers, then nothing: dropped after the read timeout, unanswered.
    let (answer, took) =
        send_and_wait_for_close(&base, b"POST /v1/builds HTTP/1.1\r\nHost: kiln\r\n");
    assert_eq!(answer, "", "{}", up.log());
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(10),
        "closed after {took:?}"
    );
    // Whole headers, half the body: 408 and closed.
    let partial = format!(
        "POST /v1/builds HTTP/1.1\r\nHost: kiln\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"v\": 1,"
    );
    let (answer, took) = send_and_wait_for_close(&base, partial.as_bytes());
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    assert_eq!(raw_json(&answer)["error"]["kind"], "timeout", "{answer}");
    assert!(took < Duration::from_secs(10), "closed after {took:?}");

    // Bodies over 1 MiB: 413, whether the length is declared (answered before the body is
    // sent) or the body is streamed in chunks (answered once 1 MiB + 1 byte has come).
    let declared = format!(
        "POST /v1/builds HTTP/1.1\r\nHost: kiln\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        2 << 20
    );
    let mut chunked = format!(
        "POST /v1/builds HTTP/1.1\r\nHost: kiln\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n",
        (1 << 20) + 1
    )
    .into_bytes();
    chunked.extend(std::iter::repeat_n(b' ', (1 << 20) + 1));
    for request in [declared.into_bytes(), chunked] {
        let (answer, _) = send_and_wait_for_close(&base, &request);
        assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
        let v = raw_json(&answer);
        assert_eq!(v["error"]["kind"], "too_large", "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("1048576 bytes"),
            "{v}"
        );
    }
    // Without the token the body is not even waited for: 401.
    let (answer, _) = send_and_wait_for_close(
        &base,
        format!(
            "POST /v1/hooks/git HTTP/1.1\r\nHost: kiln\r\nContent-Length: {}\r\n\r\n",
            2 << 20
        )
        .as_bytes(),
    );
    assert!(answer.starts_with("HTTP/1.1 401 "), "{answer}");
    assert!(requests(&nats).is_empty(), "nothing was published");

    // A build that runs (a started event, no worker will finish it) to follow.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        use kiln::bus::{EventTime, Stage, StageEvent, StageStarted};
        let bus = kiln::bus::Bus::connect_url(&nats).await.unwrap();
        let started = StageEvent::Started(StageStarted {
            v: 1,
            build: "followed".into(),
            stage: Stage::Source,
            worker: "test/1".into(),
            time: EventTime::now(),
            attempt: Some(1),
        });
        bus.publish_event(&started).await.unwrap();
    });
    let http = client();
    // Sixteen followers from one address, and the seventeenth is told why not.
    let mut followers: Vec<std::net::TcpStream> = (0..16)
        .map(|i| {
            let (s, status) = follow_raw(&base, "followed");
            assert!(status.starts_with("HTTP/1.1 200"), "follower {i}: {status}");
            s
        })
        .collect();
    let r = http
        .get(format!("{base}/v1/builds/followed/events"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 429);
    let v = r.json_value();
    assert_eq!(v["error"]["kind"], "too_many_followers", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("127.0.0.1 already follows 16 event streams"),
        "{v}"
    );
    // One goes away: its place is free again.
    drop(followers.pop());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (s, status) = follow_raw(&base, "followed");
        if status.starts_with("HTTP/1.1 200") {
            followers.push(s);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the place was not freed: {status}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The API still answers everyone else.
    let r = http
        .get(format!("{base}/v1/builds/followed"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[test]
fn running_out_of_file_descriptors_is_logged_and_survived() {
    let server = PrivateServer::start().unwrap();
    let nats = server.url();
    let home = tempfile::tempdir().unwrap();
    // `kiln up` idles with about 15 descriptors open: 40 leaves room for some 25 connections.
    let (up, base) = kiln_up_with(
        home.path(),
        &nats,
        &["--api-read-timeout", "4"],
        true,
        |c| {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit(2) only, between fork and exec.
            unsafe {
                c.pre_exec(|| {
                    let limit = libc::rlimit {
                        rlim_cur: 40,
                        rlim_max: 40,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        },
    );
    let warning = "cannot accept a connection (Too many open files (os error 24))";
    let start = Instant::now();
    let clients: Vec<std::net::TcpStream> = (0..60)
        .map(|_| std::net::TcpStream::connect(addr_of(&base)).unwrap())
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    let log = up.log();
    let warnings = log.matches(warning).count();
    assert!(warnings >= 1, "no EMFILE warning:\n{log}");
    assert!(log.contains("raise its open-file limit"), "{log}");
    // Once a second at most: the listener pauses, it does not spin.
    let seconds = start.elapsed().as_secs_f64();
    assert!(
        (warnings as f64) <= seconds + 1.0,
        "{warnings} warnings in {seconds:.1} s:\n{log}"
    );
    drop(clients);
    // The API serves again once descriptors are free (the idle ones it accepted time out).
    let http = client();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match http.get(format!("{base}/v1/builds/nothing")).send() {
            Ok(r) => {
                assert_eq!(r.status(), 404);
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "{e}\n{}", up.log()),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!up.log().contains("panicked"), "{}", up.log());
}

/// The fleet's inventory with real agents: two `kiln agent`s (nothing to run yet) join groups
/// and record a heartbeat every second; `kiln agents` and `GET /v1/agents` list them, by group
/// too; the stream keeps one heartbeat per change, not one per beat; an agent killed with
/// SIGKILL is `gone` after three silent intervals, and `kiln agents` says so by its exit.
#[test]
fn agents_record_heartbeats_and_a_silent_one_is_gone() {
    let home = shared_home();
    let server = PrivateServer::start().unwrap();
    let nats = server.url();
    let (_up, base) = kiln_up(home.path(), &nats, &[], true);
    let key = home.path().join("images.key");
    common::keygen(home.path(), &key);
    let agent = |name: &str, groups: &[&str]| -> Running {
        let mut c = kiln(home.path());
        c.args(["agent", "--nats", &nats, "--name", name])
            .args(["--watch", "127.0.0.1:9/kiln/none:latest", "--trust"])
            .arg(home.path().join("images.key.pub"))
            .args(["--require", "signature", "--heartbeat-interval", "1"])
            .arg("--state-dir")
            .arg(home.path().join(name));
        for g in groups {
            c.args(["--group", g]);
        }
        Running::spawn(c, &home.path().join(format!("{name}.log")))
    };
    let mut a = agent("hv-a", &["web", "eu-1"]);
    let _b = agent("hv-b", &["db"]);
    let agents = |extra: &[&str]| -> (Option<i32>, serde_json::Value) {
        let o = kiln(home.path())
            .args(["agents", "--json", "--nats", &nats])
            .args(extra)
            .output()
            .unwrap();
        let v = serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&o.stderr)));
        (o.status.code(), v)
    };
    let names = |v: &serde_json::Value| -> Vec<String> {
        v["agents"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["agent"].as_str().unwrap().to_string())
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let (code, all) = loop {
        let (code, v) = agents(&[]);
        if names(&v).len() == 2 || Instant::now() > deadline {
            break (code, v);
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(names(&all), ["hv-a", "hv-b"], "{all}");
    assert_eq!(code, Some(0), "{all}");
    let first = &all["agents"][0];
    assert_eq!(first["state"], "idle", "{all}");
    assert_eq!(first["health"], "idle", "{all}");
    assert_eq!(first["groups"], serde_json::json!(["eu-1", "web"]), "{all}");
    assert_eq!(first["interval_s"], 1);
    assert_eq!(first["watch"], "127.0.0.1:9/kiln/none:latest");
    assert!(first["kiln_version"].is_string() && first["running"].is_null());

    // By group, on the command line and over HTTP.
    assert_eq!(names(&agents(&["--group", "web"]).1), ["hv-a"]);
    assert_eq!(
        names(&agents(&["--group", "nobody"]).1),
        Vec::<String>::new()
    );
    let http = client()
        .get(format!("{base}/v1/agents?group=db"))
        .send()
        .unwrap();
    assert_eq!(http.status(), 200);
    assert_eq!(names(&http.json_value()), ["hv-b"]);
    let bad = client()
        .get(format!("{base}/v1/agents?group=no%20spaces"))
        .send()
        .unwrap();
    assert_eq!(bad.status(), 400);
    let text = kiln(home.path())
        .args(["agents", "--nats", &nats])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(
        text.starts_with("AGENT") && text.contains("hv-a") && text.contains("eu-1,web"),
        "{text}"
    );

    // Beats go to the bucket every second; the stream only heard the first (no change since).
    std::thread::sleep(Duration::from_secs(3));
    let stored = common::rt().block_on(async {
        let bus = kiln::bus::Bus::connect_url(&nats).await.unwrap();
        bus.stored_messages("kiln.agent.hv-a.heartbeat")
            .await
            .unwrap()
    });
    assert_eq!(stored.len(), 1, "one heartbeat per change on the stream");
    let (_, now) = agents(&[]);
    assert!(
        now["agents"][0]["last_seen_s"].as_u64().unwrap() <= 2,
        "{now}"
    );

    // A rollout to group web: kiln up's controller orders hv-a, whose registry does not answer,
    // so the first wave fails and the rollout halts with the agent's reason; the API shows it.
    let image = format!("127.0.0.1:9/kiln/none@sha256:{}", "a".repeat(64));
    let o = kiln(home.path())
        .args(["rollout", &image, "--group", "web", "--bake", "0", "--json"])
        .args(["--nats", &nats])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let started: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let id = started["id"].as_str().unwrap().to_string();
    assert_eq!(started["plan"], serde_json::json!([["hv-a"]]), "{started}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let halted = loop {
        let r = client()
            .get(format!("{base}/v1/rollouts/{id}"))
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
        let v = r.json_value();
        if v["state"] != "running" || Instant::now() > deadline {
            break v;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(halted["state"], "halted", "{halted}");
    let reason = halted["reason"].as_str().unwrap();
    assert!(
        reason.contains("hv-a: refused") && reason.contains("nothing was booted"),
        "{reason}"
    );
    let listed = client()
        .get(format!("{base}/v1/rollouts"))
        .send()
        .unwrap()
        .json_value();
    assert_eq!(listed["rollouts"][0]["id"], id.as_str(), "{listed}");
    let missing = client()
        .get(format!("{base}/v1/rollouts/r-nope"))
        .send()
        .unwrap();
    assert_eq!(missing.status(), 404);

    // hv-a dies without a word: gone after three silent intervals, and the exit says so.
    a.kill9();
    let deadline = Instant::now() + Duration::from_secs(30);
    let (code, v) = loop {
        let (code, v) = agents(&[]);
        if v["agents"][0]["state"] == "gone" || Instant::now() > deadline {
            break (code, v);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(v["agents"][0]["state"], "gone", "{v}");
    assert_eq!(v["agents"][1]["state"], "idle", "{v}");
    assert_eq!(code, Some(1), "{v}");
}
