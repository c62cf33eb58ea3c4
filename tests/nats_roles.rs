//! kiln's reference NATS permissions (docs/nats/kiln-roles.conf, docs/nats-roles.md) against a
//! real nats-server 2.9 that runs them:
//! - a build end to end with every process logged in as its role: stage workers as `worker`, the
//!   publish stage as `publisher` (on another home, so it fetches the disk through the object
//!   store), `kiln submit --follow`, `kiln status` and `kiln logs` as the submitter `ci`, and the
//!   server refusing nothing on the way;
//! - what each role must not do, refused by the server with the text it sends and nothing
//!   stored: a submitter forging a stage event or an image announcement, writing the KV bucket
//!   or the object store, deleting or purging the stream, touching a worker's durable consumer,
//!   or reading other users' replies; an agent publishing for another agent; a worker
//!   announcing an image.

mod common;

use common::nats_roles::{
    ADMIN, AGENT_HV_01, CI, PUBLISHER, RELEASE, RolesServer, WORKER, connect_as, next_error,
    start_roles_server, wait_for_stream,
};
use common::{Running, kiln, rt, shared_home};
use kiln::bus::{Bus, RetryPolicy, STREAM, StageOutputs};
use std::process::{Output, Stdio};
use std::time::Duration;

fn show(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A `kiln worker` logged in as `role`, its stderr in `log`.
fn worker(
    home: &std::path::Path,
    url: &str,
    role: common::nats_roles::Role,
    extra: &[&str],
    log: &std::path::Path,
) -> Running {
    let mut c = kiln(home);
    c.args(["worker", "--nats", url])
        .args(role.args())
        .args(common::recipe_roots())
        .args(extra);
    Running::spawn(c, log)
}

#[test]
fn every_role_does_its_part_of_a_build_and_the_server_refuses_nothing() {
    let server = start_roles_server();
    let url = server.url();
    let work = tempfile::tempdir().unwrap();
    let worker_home = shared_home();
    // The publish stage's own home: no shared blobs, the disk comes through the object store.
    let publisher_home = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    let worker_log = work.path().join("worker.log");
    let publisher_log = work.path().join("publisher.log");
    let _workers = worker(
        worker_home.path(),
        &url,
        WORKER,
        &["--stages", "source,render,rootfs,kernel,disk,verify"],
        &worker_log,
    );
    let publish_to = format!("oci:{}", layout.display());
    let _publisher = worker(
        publisher_home.path(),
        &url,
        PUBLISHER,
        &["--stages", "publish", "--publish-to", &publish_to],
        &publisher_log,
    );
    let logs = || {
        format!(
            "worker log:\n{}\npublisher log:\n{}\nserver log:\n{}",
            std::fs::read_to_string(&worker_log).unwrap_or_default(),
            std::fs::read_to_string(&publisher_log).unwrap_or_default(),
            server.log()
        )
    };

    rt().block_on(wait_for_stream(&url));

    // The submitter starts the build and follows it to the publish stage's end.
    let o = kiln(worker_home.path())
        .args([
            "submit",
            "recipes/app.yaml",
            "--profile",
            "direct",
            "--follow",
            "--timeout",
            "600",
            "--json",
            "--nats",
            &url,
        ])
        .args(CI.args())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}\n{}", show(&o), logs());
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    // The first line names the build, the others are its events.
    let id = events[0]["build"].as_str().unwrap().to_string();
    let events = &events[1..];
    let last = events.last().unwrap();
    assert_eq!(
        (&last["stage"], &last["kind"]),
        (&"publish".into(), &"completed".into()),
        "{}",
        show(&o)
    );
    let reference = last["outputs"]["reference"].as_str().unwrap_or_default();
    assert!(
        reference.starts_with(publish_to.as_str()),
        "the publish stage published to the layout: {last}"
    );
    assert!(layout.join("index.json").is_file());
    // The stages really ran as the worker user (its home had no records).
    assert!(
        events
            .iter()
            .any(|e| e["stage"] == "disk" && e["kind"] == "completed" && e["cache"] == "miss"),
        "{}",
        show(&o)
    );

    // `kiln status` (the list and the build) and `kiln logs` as the submitter.
    let o = kiln(worker_home.path())
        .args(["status", &id, "--json", "--nats", &url])
        .args(CI.args())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", show(&o));
    let status: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(status["state"], "completed", "{status}");
    let o = kiln(worker_home.path())
        .args(["status", "--json", "--nats", &url])
        .args(CI.args())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", show(&o));
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(list["builds"][0]["id"], id.as_str(), "{list}");
    let o = kiln(worker_home.path())
        .args(["logs", &id, "--nats", &url])
        .args(CI.args())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", show(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).lines().count(),
        events.len(),
        "{}",
        show(&o)
    );

    // The announcement is in the stream, published by the publisher; an agent may read it.
    rt().block_on(async {
        let (agent, _) = connect_as(&url, AGENT_HV_01, Duration::from_secs(10)).await;
        let announced = agent
            .stored_messages("kiln.image.published.>")
            .await
            .unwrap();
        assert_eq!(announced.len(), 1, "{announced:?}");
        let msg: serde_json::Value = serde_json::from_slice(&announced[0].payload).unwrap();
        assert_eq!(msg["build"], id.as_str());
    });

    // Enough was allowed: nobody was refused anything.
    let log = server.log();
    assert!(!log.contains("Violation"), "{}", logs());
    for text in [logs(), show(&o)] {
        assert!(!text.contains("Permissions Violation"), "{text}");
    }
}

/// Create the stream, the stage consumers and the buckets as the worker user, as workers do
/// when they start.
async fn set_up_as_worker(server: &RolesServer) -> Bus {
    let (bus, _) = connect_as(&server.url(), WORKER, Duration::from_secs(10)).await;
    bus.setup(&RetryPolicy::default()).await.unwrap();
    bus
}

/// What JetStream stored on `subject` (read as the worker).
async fn stored(bus: &Bus, subject: &str) -> usize {
    bus.stored_messages(subject).await.unwrap().len()
}

#[test]
fn the_server_refuses_what_a_role_may_not_do() {
    let server = start_roles_server();
    let url = server.url();
    rt().block_on(async {
        let as_worker = set_up_as_worker(&server).await;
        // A refused request has no answer: short timeouts keep the test quick.
        let quick = Duration::from_secs(2);
        let (ci, mut ci_errors) = connect_as(&url, CI, quick).await;

        // Allowed: a build request is stored (the stream's ack names its sequence).
        let seq = ci
            .publish_raw("kiln.build.requested".into(), br#"{"v":1}"#.to_vec())
            .await
            .unwrap();
        assert!(seq > 0);

        // A forged stage event: a plain publish draws the server's error, a JetStream publish
        // never gets the stream's ack, and nothing is stored.
        let forged = "kiln.build.forged-1.verify.completed";
        ci.client().publish(forged, "{}".into()).await.unwrap();
        ci.client().flush().await.unwrap();
        assert_eq!(
            next_error(&mut ci_errors).await,
            format!("nats: Permissions Violation for Publish to \"{forged}\"")
        );
        let e = ci
            .publish_raw(forged.into(), b"{}".to_vec())
            .await
            .unwrap_err();
        assert!(e.to_string().contains(forged), "{e}");
        assert!(next_error(&mut ci_errors).await.contains(forged));
        assert_eq!(stored(&as_worker, "kiln.build.forged-1.>").await, 0);

        // An image announcement is the publisher's alone.
        let e = ci
            .publish_raw("kiln.image.published.x".into(), b"{}".to_vec())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("kiln.image.published.x"), "{e}");
        assert_eq!(
            next_error(&mut ci_errors).await,
            "nats: Permissions Violation for Publish to \"kiln.image.published.x\""
        );
        assert_eq!(stored(&as_worker, "kiln.image.published.>").await, 0);

        // The workers' buckets: no KV entry, no object chunk.
        for subject in ["$KV.kiln-stages.forged", "$O.kiln-blobs.C.forged"] {
            assert!(
                ci.publish_raw(subject.into(), b"{}".to_vec())
                    .await
                    .is_err()
            );
            assert_eq!(
                next_error(&mut ci_errors).await,
                format!("nats: Permissions Violation for Publish to \"{subject}\"")
            );
        }
        // Nor through a consumer of its own that pushes stream messages to the bucket's
        // subjects: readers may create consumers and choose where one pushes, but a delivery
        // keeps the message's own subject (and needs a subscriber), so no stream stores it.
        let stream = ci.kiln_stream().await.unwrap();
        stream
            .create_consumer(async_nats::jetstream::consumer::push::Config {
                name: Some("push-into-kv".into()),
                deliver_subject: "$KV.kiln-stages.pushed".into(),
                filter_subject: "kiln.build.requested".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let kv = StageOutputs::open(&as_worker).await.unwrap();
        assert_eq!(kv.get("forged").await.unwrap(), None);
        assert_eq!(kv.get("pushed").await.unwrap(), None);

        // The stream cannot be deleted or purged, nor a stage's durable consumer deleted,
        // pulled from or reconfigured through the create request that takes its name from the
        // body (NATS 2.9 updates an existing consumer that way).
        let js = ci.jetstream();
        assert!(js.delete_stream(STREAM).await.is_err());
        assert_eq!(
            next_error(&mut ci_errors).await,
            "nats: Permissions Violation for Publish to \"$JS.API.STREAM.DELETE.KILN\""
        );
        assert!(stream.purge().await.is_err());
        assert_eq!(
            next_error(&mut ci_errors).await,
            "nats: Permissions Violation for Publish to \"$JS.API.STREAM.PURGE.KILN\""
        );
        assert!(stream.delete_consumer("kiln-source").await.is_err());
        assert_eq!(
            next_error(&mut ci_errors).await,
            "nats: Permissions Violation for Publish to \"$JS.API.CONSUMER.DELETE.KILN.kiln-source\""
        );
        let pull = ci
            .client()
            .publish_with_reply(
                "$JS.API.CONSUMER.MSG.NEXT.KILN.kiln-source",
                "_INBOX.ci.pull",
                "1".into(),
            )
            .await;
        assert!(pull.is_ok());
        ci.client().flush().await.unwrap();
        assert_eq!(
            next_error(&mut ci_errors).await,
            "nats: Permissions Violation for Publish to \"$JS.API.CONSUMER.MSG.NEXT.KILN.kiln-source\""
        );
        let body = serde_json::json!({"stream_name": STREAM, "config": {
            "name": "kiln-source", "filter_subject": "kiln.build.requested",
            "ack_policy": "explicit", "max_deliver": 1}});
        ci.client()
            .publish("$JS.API.CONSUMER.CREATE.KILN", body.to_string().into())
            .await
            .unwrap();
        ci.client().flush().await.unwrap();
        assert_eq!(
            next_error(&mut ci_errors).await,
            "nats: Permissions Violation for Publish to \"$JS.API.CONSUMER.CREATE.KILN\""
        );
        let (operator, _) = connect_as(&url, ADMIN, quick).await;
        let info = operator
            .jetstream()
            .get_stream(STREAM)
            .await
            .unwrap()
            .get_consumer::<async_nats::jetstream::consumer::pull::Config>("kiln-source")
            .await
            .unwrap()
            .cached_info()
            .clone();
        assert_eq!(
            (info.config.max_deliver, info.config.backoff.len()),
            (RetryPolicy::default().max_deliver, 3),
            "{info:?}"
        );
        // Everything still there, including the request from above.
        assert_eq!(stored(&as_worker, "kiln.build.requested").await, 1);

        // Replies go to each user's own inboxes only.
        for subject in ["_INBOX.>", "_INBOX.worker.>", "kiln.>"] {
            let _sub = ci.client().subscribe(subject).await.unwrap();
            ci.client().flush().await.unwrap();
            assert_eq!(
                next_error(&mut ci_errors).await,
                format!("nats: Permissions Violation for Subscription to \"{subject}\"")
            );
        }

        // An agent publishes about itself only.
        let (agent, mut agent_errors) = connect_as(&url, AGENT_HV_01, quick).await;
        agent
            .publish_raw("kiln.deploy.hv-01.completed".into(), b"{}".to_vec())
            .await
            .unwrap();
        assert!(
            agent
                .publish_raw("kiln.deploy.hv-02.completed".into(), b"{}".to_vec())
                .await
                .is_err()
        );
        assert_eq!(
            next_error(&mut agent_errors).await,
            "nats: Permissions Violation for Publish to \"kiln.deploy.hv-02.completed\""
        );
        assert_eq!(stored(&as_worker, "kiln.deploy.hv-01.>").await, 1);
        assert_eq!(stored(&as_worker, "kiln.deploy.hv-02.>").await, 0);

        // It records its own heartbeat in the inventory the workers made, not another's; a
        // submitter lists the fleet.
        let beat = |name: &str| kiln::bus::AgentHeartbeat {
            v: 1,
            agent: name.into(),
            groups: vec!["web".into()],
            watch: "registry:5000/web:prod".into(),
            health: kiln::bus::AgentHealth::Idle,
            running: None,
            digest: None,
            previous: None,
            deploying: None,
            pid: None,
            uptime_s: None,
            listen: None,
            kiln_version: "test".into(),
            interval_s: 10,
            sent_ms: 1,
            time: kiln::bus::EventTime::now(),
        };
        let inventory = kiln::bus::agents::Inventory::open_existing(&agent)
            .await
            .unwrap()
            .expect("the workers made kiln-agents");
        inventory.beat(&beat("hv-01"), true).await.unwrap();
        assert!(inventory.beat(&beat("hv-02"), false).await.is_err());
        assert_eq!(
            next_error(&mut agent_errors).await,
            "nats: Permissions Violation for Publish to \"$KV.kiln-agents.hv-02\""
        );
        let (ci_reader, _) = connect_as(&url, CI, quick).await;
        let fleet = kiln::bus::agents::Inventory::open_existing(&ci_reader)
            .await
            .unwrap()
            .unwrap()
            .list(0)
            .await
            .unwrap();
        let names: Vec<&str> = fleet.iter().map(|e| e.heartbeat.agent.as_str()).collect();
        assert_eq!(names, ["hv-01"]);

        // A stage worker publishes stage events, not requests or announcements.
        let (worker, mut worker_errors) = connect_as(&url, WORKER, quick).await;
        worker
            .publish_raw("kiln.build.b-1.verify.completed".into(), b"{}".to_vec())
            .await
            .unwrap();
        for subject in ["kiln.image.published.x", "kiln.build.requested"] {
            assert!(
                worker
                    .publish_raw(subject.into(), b"{}".to_vec())
                    .await
                    .is_err()
            );
            assert_eq!(
                next_error(&mut worker_errors).await,
                format!("nats: Permissions Violation for Publish to \"{subject}\"")
            );
        }
        assert_eq!(stored(&as_worker, "kiln.image.published.>").await, 0);
        assert_eq!(stored(&as_worker, "kiln.build.requested").await, 1);
    });
    // The server logged each refusal with the user's name.
    let log = server.log();
    for line in [
        "Publish Violation - User \"ci\", Subject \"kiln.build.forged-1.verify.completed\"",
        "Publish Violation - User \"ci\", Subject \"$JS.API.STREAM.DELETE.KILN\"",
        "Publish Violation - User \"agent-hv-01\", Subject \"kiln.deploy.hv-02.completed\"",
        "Subscription Violation - User \"ci\", Subject \"_INBOX.>\"",
    ] {
        assert!(log.contains(line), "no {line:?} in the server log:\n{log}");
    }
}

#[test]
fn a_submitter_is_told_when_the_server_refuses_it() {
    // `kiln submit` as a user that may not publish requests: the warning quotes the server.
    let server = start_roles_server();
    let url = server.url();
    rt().block_on(async {
        set_up_as_worker(&server).await;
    });
    let home = tempfile::tempdir().unwrap();
    let o = kiln(home.path())
        .args(["submit", "recipes/minimal.yaml", "--nats", &url])
        .args(AGENT_HV_01.args())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_ne!(o.status.code(), Some(0), "{}", show(&o));
    assert!(
        err.contains("Permissions Violation for Publish to \"kiln.build.requested\""),
        "{}",
        show(&o)
    );
    // At once, from the server's error, not after the ack's timeout.
    assert!(
        err.contains("the NATS server refused to let this user publish to kiln.build.requested"),
        "{}",
        show(&o)
    );
    assert!(err.contains("docs/nats-roles.md"), "{}", show(&o));
}

/// A rollout under the reference roles: `kiln rollout` and `kiln controller` as the release
/// user, an agent as its own user. The agent is ordered, reads the rollouts bucket to check the
/// order, answers (it cannot reach the image's registry: a refusal), and the rollout halts with
/// its reason; the server refused nobody anything.
#[test]
fn a_release_manager_rolls_out_to_an_agent_under_their_roles() {
    let server = start_roles_server();
    let url = server.url();
    rt().block_on(set_up_as_worker(&server));
    let home = shared_home();
    let work = tempfile::tempdir().unwrap();
    let key = work.path().join("images.key");
    common::keygen(home.path(), &key);
    let mut agent = kiln(home.path());
    agent
        .args(["agent", "--nats", &url, "--name", "hv-01"])
        .args(AGENT_HV_01.args())
        .args(["--watch", "127.0.0.1:9/kiln/none:latest", "--trust"])
        .arg(work.path().join("images.key.pub"))
        .args(["--require", "signature", "--group", "web"])
        .args(["--heartbeat-interval", "1", "--state-dir"])
        .arg(work.path().join("hv-01"));
    let _agent = Running::spawn(agent, &work.path().join("agent.log"));
    let mut controller = kiln(home.path());
    controller
        .args(["controller", "--nats", &url, "--name", "ctl"])
        .args(RELEASE.args());
    let _controller = Running::spawn(controller, &work.path().join("controller.log"));
    let logs = || {
        ["agent.log", "controller.log"]
            .iter()
            .map(|f| std::fs::read_to_string(work.path().join(f)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n---\n")
            + "\n--- server:\n"
            + &server.log()
    };
    // The agent is in the inventory once it beat.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let o = kiln(home.path())
            .args(["agents", "--json", "--nats", &url])
            .args(RELEASE.args())
            .output()
            .unwrap();
        if String::from_utf8_lossy(&o.stdout).contains("hv-01") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{}\n{}",
            show(&o),
            logs()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let image = format!("127.0.0.1:9/kiln/none@sha256:{}", "a".repeat(64));
    let o = kiln(home.path())
        .args([
            "rollout", &image, "--group", "web", "--bake", "0", "--follow",
        ])
        .args(["--json", "--nats", &url])
        .args(RELEASE.args())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}\n{}", show(&o), logs());
    let text = String::from_utf8_lossy(&o.stdout);
    let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(last["state"], "halted", "{last}");
    let reason = last["reason"].as_str().unwrap();
    assert!(
        reason.contains("hv-01: refused") && reason.contains("nothing was booted"),
        "{reason}\n{}",
        logs()
    );
    assert!(!server.log().contains("Violation"), "{}", logs());
    assert!(!logs().contains("Permissions Violation"), "{}", logs());
}
