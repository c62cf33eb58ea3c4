//! kiln's message bus against a real `nats-server` (Debian's 2.9.10 here), one private server per
//! test: idempotent stream/consumer setup, a request published by a hand-written NATS protocol
//! client, work sharing, progress acks, redelivery limits, final errors, the blob object store
//! across two local stores, the KV workaround, a server restart, and build history. Also checks
//! that every example in docs/messages.md parses and that docs/schemas/ is current.

use kiln::bus::*;
use kiln::digest::Digest256;
use kiln::home::BlobStore;
use std::io::{BufRead, BufReader, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod common;
use common::{free_port, root};

/// `(example name, JSON text)` for every `<!-- example: NAME -->` in docs/messages.md. A `sh`
/// block contributes the single-quoted JSON argument of its `nats pub`.
fn doc_examples() -> Vec<(String, String)> {
    let doc = std::fs::read_to_string(root().join("docs/messages.md")).unwrap();
    let mut out = Vec::new();
    let mut rest = doc.as_str();
    while let Some(at) = rest.find("<!-- example: ") {
        rest = &rest[at + "<!-- example: ".len()..];
        let end = rest.find(" -->").unwrap();
        let name = rest[..end].to_string();
        let fence = rest.find("```").unwrap();
        let body_start = fence + rest[fence..].find('\n').unwrap() + 1;
        let body_len = rest[body_start..].find("```").unwrap();
        let body = &rest[body_start..body_start + body_len];
        let json = if name.ends_with("(nats pub)") {
            assert!(body.contains("nats") && body.contains(" pub kiln.build.requested"));
            let q1 = body.find('\'').unwrap();
            let q2 = body[q1 + 1..].find('\'').unwrap();
            body[q1 + 1..q1 + 1 + q2].to_string()
        } else {
            body.to_string()
        };
        out.push((name, json));
        rest = &rest[body_start + body_len..];
    }
    out
}

#[test]
fn every_documented_example_parses() {
    let examples = doc_examples();
    let mut seen = std::collections::BTreeSet::new();
    for (name, json) in &examples {
        let bytes = json.as_bytes();
        let base = name.split(' ').next().unwrap();
        let r = match base {
            "build-requested" => decode::<BuildRequest>(bytes).map(|_| ()),
            "stage-started" => decode::<StageStarted>(bytes).map(|_| ()),
            "stage-progress" => decode::<StageProgress>(bytes).map(|_| ()),
            "stage-completed" => decode::<StageCompleted>(bytes).map(|_| ()),
            "stage-failed" => decode::<StageFailed>(bytes).map(|_| ()),
            "image-published" => decode::<ImagePublished>(bytes).map(|_| ()),
            "deploy-completed" => decode::<DeployCompleted>(bytes).map(|_| ()),
            "deploy-failed" => decode::<DeployFailed>(bytes).map(|_| ()),
            "agent-heartbeat" => decode::<kiln::bus::AgentHeartbeat>(bytes).map(|_| ()),
            "deploy-order" => decode::<kiln::bus::DeployOrder>(bytes).map(|_| ()),
            "rollout" => decode::<kiln::bus::Rollout>(bytes).map(|_| ()),
            "image-revoked" => decode::<kiln::bus::ImageRevoked>(bytes).map(|_| ()),
            other => panic!("docs/messages.md: unknown example name {other:?}"),
        };
        r.unwrap_or_else(|e| panic!("docs/messages.md example {name}: {e}\n{json}"));
        seen.insert(base.to_string());
    }
    // Every message type has an example (and a schema file of the same name).
    for (file, _) in kiln::bus::messages::json_schemas() {
        let name = file.trim_end_matches(".json");
        assert!(
            seen.contains(name),
            "docs/messages.md has no example of {name}"
        );
    }
    assert!(
        examples.iter().any(|(n, _)| n.ends_with("(nats pub)")),
        "the CI `nats pub` example is missing"
    );
}

#[test]
fn schema_files_are_current() {
    let dir = root().join("docs/schemas");
    let schemas = kiln::bus::messages::json_schemas();
    if std::env::var_os("KILN_UPDATE_SCHEMAS").is_some() {
        std::fs::create_dir_all(&dir).unwrap();
        for (file, schema) in &schemas {
            let text = serde_json::to_string_pretty(schema).unwrap() + "\n";
            std::fs::write(dir.join(file), text).unwrap();
        }
    }
    for (file, schema) in &schemas {
        let on_disk = std::fs::read_to_string(dir.join(file)).unwrap_or_else(|e| {
            panic!("docs/schemas/{file}: {e} (run KILN_UPDATE_SCHEMAS=1 cargo test --test bus)")
        });
        assert_eq!(
            on_disk.trim(),
            serde_json::to_string_pretty(schema).unwrap().trim(),
            "docs/schemas/{file} is stale: run KILN_UPDATE_SCHEMAS=1 cargo test --test bus"
        );
    }
    let mut listed: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    listed.sort();
    let mut expected: Vec<String> = schemas.into_iter().map(|(f, _)| f).collect();
    expected.sort();
    assert_eq!(listed, expected, "docs/schemas/ holds files no message has");
}

async fn connect(server: &PrivateServer) -> Bus {
    Bus::connect_url(&server.url()).await.unwrap()
}

fn request(id: &str) -> BuildRequest {
    let mut r = BuildRequest::new(
        RecipeSource::Path {
            path: "recipes/minimal.yaml".into(),
        },
        "test",
    );
    r.id = Some(id.to_string());
    r
}

fn fast_policy(ack_wait_ms: u64, backoff_ms: &[u64], max_deliver: i64) -> RetryPolicy {
    RetryPolicy {
        backoff: backoff_ms
            .iter()
            .map(|m| Duration::from_millis(*m))
            .collect(),
        ack_wait: Duration::from_millis(ack_wait_ms),
        max_deliver,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_twice_is_idempotent() {
    let server = PrivateServer::start().unwrap();
    let bus = connect(&server).await;
    let policy = RetryPolicy::default();
    bus.setup(&policy).await.unwrap();
    bus.setup(&policy).await.unwrap();
    let mut stream = bus.jetstream().get_stream(STREAM).await.unwrap();
    let info = stream.info().await.unwrap().clone();
    assert_eq!(info.config.subjects, vec!["kiln.>".to_string()]);
    assert!(info.config.allow_direct);
    assert_eq!(info.config.max_age, RETENTION);
    for stage in Stage::ALL {
        let c = stream
            .consumer_info(stage.consumer_name())
            .await
            .unwrap_or_else(|e| panic!("consumer of {stage}: {e}"));
        assert_eq!(c.config.filter_subject, stage.trigger_subject());
        assert_eq!(c.config.max_deliver, 4);
        assert_eq!(c.config.backoff.len(), 3);
        assert_eq!(c.config.ack_wait, Duration::from_secs(30));
    }
    // Still exactly one of each after the second setup.
    let names: Vec<String> = {
        use futures::TryStreamExt;
        stream.consumer_names().try_collect().await.unwrap()
    };
    assert_eq!(names.len(), Stage::ALL.len(), "{names:?}");
    // A changed policy is applied to the existing consumer.
    let changed = fast_policy(1000, &[2000, 4000], 5);
    bus.ensure_consumer(Stage::Disk, &changed).await.unwrap();
    let c = stream
        .consumer_info(Stage::Disk.consumer_name())
        .await
        .unwrap();
    assert_eq!(c.config.max_deliver, 5);
    assert_eq!(c.config.backoff, changed.backoff);
    // A bad policy is refused before the server sees it.
    let bad = fast_policy(1000, &[100, 200], 2);
    assert!(bus.ensure_consumer(Stage::Disk, &bad).await.is_err());
}

/// Publish with the NATS text protocol over a plain socket: no kiln code, no client library.
fn raw_publish(port: u16, subject: &str, payload: &[u8]) {
    let mut sock = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut reader = BufReader::new(sock.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("INFO "), "{line}");
    write!(
        sock,
        "CONNECT {{\"verbose\":false,\"pedantic\":true,\"name\":\"raw-test\"}}\r\nPUB {subject} {}\r\n",
        payload.len()
    )
    .unwrap();
    sock.write_all(payload).unwrap();
    sock.write_all(b"\r\nPING\r\n").unwrap();
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        assert!(!line.starts_with("-ERR"), "{line}");
        if line.starts_with("PONG") {
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_protocol_request_reaches_the_source_stage() {
    let server = PrivateServer::start().unwrap();
    let bus = connect(&server).await;
    let worker = Worker::new(&bus, Stage::Source, RetryPolicy::default())
        .await
        .unwrap();
    let payload = br#"{"v":1,"id":"from-ci","recipe":{"git":{"url":"https://git.example/r.git","ref":"main","path":"web.yaml"}},"params":{"a":"b"},"requester":"ci","future_field":[1,2]}"#;
    raw_publish(server.port(), "kiln.build.requested", payload);
    let got: Arc<Mutex<Vec<BuildRequest>>> = Arc::default();
    let g = got.clone();
    let handled = worker
        .process_one(
            &move |d: Delivery| {
                let g = g.clone();
                async move {
                    assert_eq!(d.subject(), "kiln.build.requested");
                    assert_eq!(d.attempt(), 1);
                    g.lock().unwrap().push(d.decode::<BuildRequest>()?);
                    Ok::<_, DecodeError>(Outcome::Done)
                }
            },
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert_eq!(handled, Some(Handled::Acked));
    let got = got.lock().unwrap();
    assert_eq!(got.len(), 1);
    let r = &got[0];
    assert_eq!(r.id.as_deref(), Some("from-ci"));
    assert_eq!(r.requester, "ci");
    assert_eq!(r.params.get("a").map(String::as_str), Some("b"));
    assert!(r.verify);
    match &r.recipe {
        RecipeSource::Git { git } => {
            assert_eq!(git.git_ref, "main");
            assert_eq!(git.path, "web.yaml");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_share_one_durable_consumer() {
    let server = PrivateServer::start().unwrap();
    let publisher = connect(&server).await;
    publisher.ensure_kiln_stream().await.unwrap();
    let n = 8;
    let policy = RetryPolicy::default();
    // Each worker has its own connection, as separate processes would.
    let mut tasks = Vec::new();
    let seen: Arc<Mutex<Vec<(usize, String)>>> = Arc::default();
    let (stop_tx, _) = tokio::sync::broadcast::channel::<()>(1);
    for w in 0..2 {
        let bus = connect(&server).await;
        let worker = Worker::new(&bus, Stage::Source, policy.clone())
            .await
            .unwrap();
        let seen = seen.clone();
        let mut stop = stop_tx.subscribe();
        tasks.push(tokio::spawn(async move {
            worker
                .run(
                    move |d: Delivery| {
                        let seen = seen.clone();
                        async move {
                            let r: BuildRequest = d.decode()?;
                            tokio::time::sleep(Duration::from_millis(150)).await;
                            seen.lock().unwrap().push((w, r.id.unwrap_or_default()));
                            Ok::<_, DecodeError>(Outcome::Done)
                        }
                    },
                    async move {
                        let _ = stop.recv().await;
                    },
                )
                .await
        }));
    }
    for i in 0..n {
        publisher
            .publish_request(&request(&format!("b{i}")))
            .await
            .unwrap();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while seen.lock().unwrap().len() < n && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop_tx.send(());
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let seen = seen.lock().unwrap().clone();
    let mut ids: Vec<&str> = seen.iter().map(|(_, id)| id.as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n, "each message handled exactly once: {seen:?}");
    assert_eq!(seen.len(), n, "{seen:?}");
    for w in 0..2 {
        assert!(
            seen.iter().any(|(who, _)| *who == w),
            "worker {w} got nothing: {seen:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_acks_keep_a_slow_message() {
    let server = PrivateServer::start().unwrap();
    let bus = connect(&server).await;
    // Ack wait 1 s, no backoff; the handler takes 3.5 s.
    let policy = fast_policy(1000, &[], 5);
    let worker = Worker::new(&bus, Stage::Render, policy.clone())
        .await
        .unwrap();
    let other = Worker::new(&connect(&server).await, Stage::Render, policy)
        .await
        .unwrap();
    let done = StageEvent::Completed(StageCompleted {
        v: kiln::bus::COMPLETED_VERSION,
        build: "slow".into(),
        stage: Stage::Source,
        worker: "t".into(),
        time: EventTime::now(),
        outputs: serde_json::json!({}),
        state_digest: format!("sha256:{}", "0".repeat(64)),
        cache: CacheStatus::Miss,
        duration_ms: 1,
    });
    bus.publish_event(&done).await.unwrap();
    let calls = Arc::new(Mutex::new(Vec::new()));
    let c = calls.clone();
    let handler = move |d: Delivery| {
        let c = c.clone();
        async move {
            c.lock().unwrap().push(d.attempt());
            tokio::time::sleep(Duration::from_millis(3500)).await;
            Ok::<_, String>(Outcome::Done)
        }
    };
    let slow = worker.process_one(&handler, Duration::from_secs(5));
    // Meanwhile another worker must not get the message redelivered.
    let (slow, stolen) = tokio::join!(slow, async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        other.next_message(Duration::from_secs(4)).await
    });
    assert_eq!(slow.unwrap(), Some(Handled::Acked));
    let stolen = stolen.unwrap();
    assert!(
        stolen.is_none(),
        "redelivered while in progress: {:?}",
        stolen.map(|m| m.subject.to_string())
    );
    assert_eq!(*calls.lock().unwrap(), vec![1]);
    assert!(
        other
            .next_message(Duration::from_secs(2))
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_errors_are_retried_then_given_up() {
    let server = PrivateServer::start().unwrap();
    let bus = connect(&server).await;
    let policy = fast_policy(1000, &[300, 300], 3);
    let worker = Worker::new(&bus, Stage::Source, policy).await.unwrap();
    bus.publish_request(&request("flaky")).await.unwrap();
    let attempts: Arc<Mutex<Vec<(u64, bool)>>> = Arc::default();
    let a = attempts.clone();
    let handler = move |d: Delivery| {
        let a = a.clone();
        async move {
            a.lock().unwrap().push((d.attempt(), d.is_last_attempt()));
            Err::<Outcome, _>("network unreachable")
        }
    };
    let mut results = Vec::new();
    for _ in 0..3 {
        results.push(
            worker
                .process_one(&handler, Duration::from_secs(5))
                .await
                .unwrap(),
        );
    }
    assert_eq!(
        results,
        vec![
            Some(Handled::Retrying),
            Some(Handled::Retrying),
            Some(Handled::GaveUp)
        ]
    );
    assert_eq!(
        *attempts.lock().unwrap(),
        vec![(1, false), (2, false), (3, true)]
    );
    // Nothing more comes, not even after the ack wait.
    assert!(
        worker
            .next_message(Duration::from_secs(2))
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn final_errors_are_not_redelivered() {
    let server = PrivateServer::start().unwrap();
    let bus = connect(&server).await;
    let policy = fast_policy(500, &[], 5);
    let worker = Worker::new(&bus, Stage::Source, policy).await.unwrap();
    raw_publish(
        server.port(),
        "kiln.build.requested",
        br#"{"v":1,"recipe":{"path":"x"}}"#,
    );
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let e = errors.clone();
    let handler = move |d: Delivery| {
        let e = e.clone();
        async move {
            match d.decode::<BuildRequest>() {
                Ok(_) => Ok::<_, String>(Outcome::Done),
                Err(err) => {
                    e.lock().unwrap().push(err.to_string());
                    Ok(Outcome::Final)
                }
            }
        }
    };
    let r = worker
        .process_one(&handler, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(r, Some(Handled::Terminated));
    let errors = errors.lock().unwrap().clone();
    assert_eq!(errors.len(), 1);
    assert!(errors[0].contains("`requester`"), "{errors:?}");
    assert!(
        worker
            .next_message(Duration::from_secs(2))
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_travel_between_two_hosts() {
    let server = PrivateServer::start().unwrap();
    let host_a = tempfile::tempdir().unwrap();
    let host_b = tempfile::tempdir().unwrap();
    let a = Blobs::open(&connect(&server).await, BlobStore::new(host_a.path()))
        .await
        .unwrap();
    let b = Blobs::open(&connect(&server).await, BlobStore::new(host_b.path()))
        .await
        .unwrap();
    // 3 MiB + a bit: several chunks and a partial one.
    let data: Vec<u8> = (0..3 * 1024 * 1024 + 12345u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let src = host_a.path().join("image.raw");
    std::fs::write(&src, &data).unwrap();
    let digest = a.put_blob(&src).await.unwrap();
    assert_eq!(digest, Digest256::of(&data));
    assert!(a.local().contains(&digest));
    assert!(b.remote_has(&digest).await);
    // Putting again is a no-op.
    assert_eq!(a.put_blob(&src).await.unwrap(), digest);

    assert!(!b.local().contains(&digest));
    let path = b.get_blob(&digest).await.unwrap();
    assert_eq!(path, b.local().path(&digest));
    assert!(std::fs::read(&path).unwrap() == data);

    // A corrupted local copy is not used: it is replaced from the bucket.
    let mut bad = data.clone();
    bad[1000] ^= 0xff;
    std::fs::write(&path, &bad).unwrap();
    let again = b.get_blob(&digest).await.unwrap();
    assert!(std::fs::read(&again).unwrap() == data);
    // No temp files left beside the blob.
    let files = std::fs::read_dir(path.parent().unwrap()).unwrap().count();
    assert_eq!(files, 1);

    let missing = Digest256::of(b"never stored");
    match b.get_blob(&missing).await {
        Err(BlobError::NotFound { digest }) => assert_eq!(digest, missing),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage_outputs_kv_works_on_this_server() {
    let server = PrivateServer::start().unwrap();
    let bus = connect(&server).await;
    let version = bus.client().server_info().version;
    eprintln!("nats-server {version}");
    let kv = StageOutputs::open(&bus).await.unwrap();
    let _again = StageOutputs::open(&bus).await.unwrap();
    let key = "disk/sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
    assert_eq!(kv.get(key).await.unwrap(), None);
    let outputs = serde_json::json!({"disk": "sha256:00", "size": 123});
    kv.put(key, &outputs).await.unwrap();
    assert_eq!(kv.get(key).await.unwrap(), Some(outputs.clone()));
    let newer = serde_json::json!({"disk": "sha256:01"});
    kv.put(key, &newer).await.unwrap();
    // Read back through a second connection.
    let kv2 = StageOutputs::open(&connect(&server).await).await.unwrap();
    assert_eq!(kv2.get(key).await.unwrap(), Some(newer));
    assert!(kv.put("bad key", &outputs).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_the_stream_and_redelivers_unacked() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut server = PrivateServer::start_in(&dir.path().join("js"), port).unwrap();
    let bus = connect(&server).await;
    let policy = fast_policy(1000, &[], -1);
    let worker = Worker::new(&bus, Stage::Source, policy).await.unwrap();
    bus.publish_request(&request("survivor")).await.unwrap();
    let first = worker
        .next_message(Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.info().unwrap().delivered, 1);
    drop(first); // never acked: the "worker" died with the server

    server.restart().unwrap();
    // The client reconnects by itself; the message comes again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let again = loop {
        match worker.next_message(Duration::from_secs(2)).await {
            Ok(Some(m)) => break m,
            Ok(None) | Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            other => panic!("no redelivery after restart: {other:?}"),
        }
    };
    let r: BuildRequest = decode(&again.payload).unwrap();
    assert_eq!(r.id.as_deref(), Some("survivor"));
    // The delivery count itself may start again at 1: the server writes consumer state to its
    // store asynchronously, and a restart can come before that write. What matters is that the
    // unacked message was not lost.
    again.double_ack().await.unwrap();
    let mut stream = bus.jetstream().get_stream(STREAM).await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 1);
}

fn started(build: &str, stage: Stage) -> StageEvent {
    StageEvent::Started(StageStarted {
        v: 1,
        build: build.into(),
        stage,
        worker: "w1".into(),
        time: EventTime::now(),
        attempt: Some(1),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_events_are_one_builds_history_in_order() {
    let server = PrivateServer::start().unwrap();
    let bus = connect(&server).await;
    bus.ensure_kiln_stream().await.unwrap();
    assert!(bus.build_events("a").await.unwrap().is_empty());
    let a_events = vec![
        started("a", Stage::Source),
        StageEvent::Progress(StageProgress {
            v: 1,
            build: "a".into(),
            stage: Stage::Source,
            worker: "w1".into(),
            time: EventTime::UnixMs(1),
            fraction: Some(0.5),
            message: Some("cloning".into()),
        }),
        StageEvent::Completed(StageCompleted {
            v: kiln::bus::COMPLETED_VERSION,
            build: "a".into(),
            stage: Stage::Source,
            worker: "w1".into(),
            time: EventTime::now(),
            outputs: serde_json::json!({"recipe": "sha256:00"}),
            state_digest: format!("sha256:{}", "0".repeat(64)),
            cache: CacheStatus::Hit,
            duration_ms: 3,
        }),
        started("a", Stage::Render),
        StageEvent::Failed(StageFailed {
            v: 1,
            build: "a".into(),
            stage: Stage::Render,
            worker: "w2".into(),
            time: EventTime::now(),
            error: ErrorInfo {
                kind: ErrorKind::Recipe,
                message: "bad".into(),
                file: Some("r.yaml".into()),
                line: Some(3),
                column: Some(7),
                help: None,
                detail: None,
            },
            attempts: Some(1),
            duration_ms: None,
        }),
    ];
    for (i, e) in a_events.iter().enumerate() {
        bus.publish_event(e).await.unwrap();
        // Another build's events and a request interleave.
        bus.publish_event(&started(&format!("b{i}"), Stage::Source))
            .await
            .unwrap();
        bus.publish_event(&started("ab", Stage::Source))
            .await
            .unwrap();
        bus.publish_request(&request("a")).await.unwrap();
    }
    // A foreign publisher's junk on a build subject does not hide the rest.
    raw_publish(server.port(), "kiln.build.a.disk.progress", b"not json");

    let got = bus.build_events("a").await.unwrap();
    assert_eq!(got.len(), a_events.len() + 1);
    let mut last_seq = 0;
    for (rec, want) in got.iter().zip(&a_events) {
        assert!(rec.sequence > last_seq);
        last_seq = rec.sequence;
        assert_eq!(rec.event.as_ref().unwrap(), want);
        assert_eq!(rec.subject, want.subject());
    }
    assert!(got.last().unwrap().event.is_err());

    // follow: history first, then a new event as it is published.
    use futures::StreamExt;
    let mut live = Box::pin(bus.follow("a", true).await.unwrap());
    for want in &a_events {
        let rec = live.next().await.unwrap().unwrap();
        assert_eq!(rec.event.as_ref().unwrap(), want);
    }
    let _junk = live.next().await.unwrap().unwrap();
    let new = started("a", Stage::Rootfs);
    bus.publish_event(&new).await.unwrap();
    let rec = tokio::time::timeout(Duration::from_secs(5), live.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(rec.event.unwrap(), new);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_errors_say_where() {
    let port = free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let err = tokio::time::timeout(Duration::from_secs(15), Bus::connect_url(&url))
        .await
        .expect("connecting to a closed port must fail, not hang")
        .unwrap_err();
    assert!(err.to_string().contains(&url), "{err}");

    let mut opts = ConnectOptions::new(&url);
    opts.auth = Auth::CredsFile("/nonexistent/kiln.creds".into());
    let err = Bus::connect(&opts).await.unwrap_err();
    assert!(err.to_string().contains("/nonexistent/kiln.creds"), "{err}");

    // User and password against a server that requires them.
    let server = PrivateServer::start_with_args(&["--user", "kiln", "--pass", "s3cret"]).unwrap();
    let mut opts = ConnectOptions::new(server.url());
    let err = Bus::connect(&opts).await.unwrap_err();
    assert!(err.to_string().contains(&server.url()), "{err}");
    opts.auth = Auth::UserPassword {
        user: "kiln".into(),
        password: "s3cret".into(),
    };
    let bus = Bus::connect(&opts).await.unwrap();
    bus.ensure_kiln_stream().await.unwrap();
    drop(server);

    // A token.
    let server = PrivateServer::start_with_args(&["--auth", "t0ken"]).unwrap();
    let mut opts = ConnectOptions::new(server.url());
    opts.auth = Auth::Token("wrong".into());
    assert!(Bus::connect(&opts).await.is_err());
    opts.auth = Auth::Token("t0ken".into());
    Bus::connect(&opts).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recent_builds_come_from_the_last_requests_and_the_index() {
    let server = PrivateServer::start().unwrap();
    let bus = connect(&server).await;
    bus.ensure_kiln_stream().await.unwrap();
    let index = BuildIndex::open(&bus).await.unwrap();
    // 300 builds, each followed by events of its own (so requests are sparse in the stream);
    // the even ones were taken by a worker and indexed, the odd ones are still queued.
    for i in 0..300u64 {
        let id = format!("b{i:03}");
        bus.publish_request(&request(&id)).await.unwrap();
        for stage in Stage::ALL {
            bus.publish_event(&started(&id, stage)).await.unwrap();
        }
        if i.is_multiple_of(2) {
            let event = started(&id, Stage::Render);
            index.update(&id, 1, |s| s.apply(&event, 2)).await.unwrap();
        }
    }
    // A request without an id is listed under the id its source stage will assign it.
    let anonymous = BuildRequest::new(
        RecipeSource::Inline {
            inline: "name: x\n".into(),
            name: "x.yaml".into(),
        },
        "ci",
    );
    let seq = bus.publish_request(&anonymous).await.unwrap();
    let stored = bus.jetstream().get_stream(STREAM).await.unwrap();
    let at = stored.direct_get(seq).await.unwrap().time;
    let assigned = assigned_build_id((at.unix_timestamp_nanos() / 1_000_000) as u64, seq);

    let list = kiln::bus::index::recent(&bus, Some(&index), 20)
        .await
        .unwrap();
    let ids: Vec<&str> = list.iter().map(|b| b.id.as_str()).collect();
    let mut want = vec![assigned.clone()];
    want.extend((281..300).rev().map(|i| format!("b{i:03}")));
    assert_eq!(ids, want);
    assert_eq!(list[0].state, BuildPhase::Queued);
    assert_eq!(list[0].recipe.as_deref(), Some("x.yaml (inline)"));
    for b in &list[1..] {
        let n: u64 = b.id[1..].parse().unwrap();
        let want = if n.is_multiple_of(2) {
            (BuildPhase::Running, Some(Stage::Render))
        } else {
            (BuildPhase::Queued, None)
        };
        assert_eq!((b.state, b.stage), want, "{b:?}");
    }
    // Every build when the limit is larger than the history; none for 0; and without an index
    // (no worker ever ran) every request is queued.
    let all = kiln::bus::index::recent(&bus, Some(&index), 1000)
        .await
        .unwrap();
    assert_eq!(all.len(), 301);
    assert_eq!(all.last().unwrap().id, "b000");
    assert!(
        kiln::bus::index::recent(&bus, Some(&index), 0)
            .await
            .unwrap()
            .is_empty()
    );
    let bare = kiln::bus::index::recent(&bus, None, 5).await.unwrap();
    assert!(
        bare.iter().all(|b| b.state == BuildPhase::Queued),
        "{bare:?}"
    );
    assert_eq!(bare[1].id, "b299");
}
