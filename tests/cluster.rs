//! kiln on a three-node NATS JetStream cluster (the Debian `nats-server`, started by the test on
//! loopback ports; see tests/common/cluster.rs), with the servers' own monitoring endpoint
//! (`/jsz`) as the oracle for replicas and leaders:
//! - `kiln up` gives the stream, the KV bucket and the object store three replicas without a
//!   flag, scales an existing one-replica stream up without losing its messages, and a worker
//!   asking for fewer does not scale them down;
//! - TLS with a private CA and client certificates made by openssl: a build runs over `tls://`,
//!   a client trusting another CA is told which server's certificate does not verify and why;
//! - the node leading the `KILN` stream, then the one leading the object store, SIGKILLed while
//!   builds run: every build completes once per stage with the image a build without the fault
//!   makes, and the restarted nodes catch up;
//! - the node leading the object store SIGKILLed while the disk stage uploads its image, with a
//!   second worker host (own `$KILN_HOME`) ready: the build completes once per stage, every
//!   record in `kiln-stages` names only blobs the object store holds (asked with the NATS
//!   client), and a later build with the same inputs gives the image a build without a cluster
//!   gives;
//! - two of three nodes down: `kiln submit`, `kiln status` and a starting worker say "no
//!   JetStream quorum", nothing stored is lost, and builds go on when a node returns;
//! - two `kiln worker`s as separate hosts, each in a network namespace of its own with an empty
//!   `$KILN_HOME`, sharing only NATS, build one image with the digest a build without a cluster
//!   gives.
//!
//! Builds use recipes/minimal.yaml without the boot check (`--no-verify`): the point here is the
//! cluster, and QEMU under TCG would add minutes.

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

mod common;
use common::cluster::Cluster;
use common::{Running, json_lines, kiln, shared_home};

const OBJ: &str = "OBJ_kiln-blobs";
const KV: &str = "KV_kiln-stages";

fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Wait until `log` (a kiln process's stderr) contains `needle`.
fn wait_for_log(p: &Running, needle: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    while !p.log().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "no {needle:?} after {limit:?}:\n{}",
            p.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `kiln up` (workers, no API) against `urls`, with extra arguments.
fn up(home: &Path, urls: &str, extra: &[std::ffi::OsString], log: &Path) -> Running {
    let mut c = kiln(home);
    c.args(["up", "--nats", urls, "--listen", "none"])
        .args(common::recipe_roots())
        .args(["--ack-wait", "3", "--max-deliver", "20"])
        .args(extra);
    Running::spawn(c, log)
}

#[test]
fn kiln_up_makes_everything_r3_scales_r1_up_and_never_down() {
    let cluster = Cluster::start(3);
    let rt = common::rt();

    // An R1 KILN stream made before, as an older kiln made it, with messages in it.
    let payloads: Vec<String> = (0..5).map(|i| format!("kept {i}")).collect();
    rt.block_on(async {
        let client = async_nats::connect(cluster.url(0)).await.unwrap();
        let js = async_nats::jetstream::new(client);
        js.create_stream(async_nats::jetstream::stream::Config {
            name: "KILN".into(),
            subjects: vec!["kiln.>".into()],
            num_replicas: 1,
            ..Default::default()
        })
        .await
        .unwrap();
        for p in &payloads {
            js.publish("kiln.test.kept", p.clone().into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    });
    assert_eq!(cluster.replicas("KILN"), Some(1));

    // `kiln up` with no --replicas and the whole list of nodes.
    let home = tempfile::tempdir().unwrap();
    let log = home.path().join("up.log");
    let up = up(home.path(), &cluster.urls(), &[], &log);
    wait_for_log(&up, "ready", Duration::from_secs(60));
    for name in ["KILN", KV, "KV_kiln-states", "KV_kiln-builds", OBJ] {
        // Every node holds a copy, and the leader sees both followers current.
        cluster.wait_for_stream(name, Duration::from_secs(30), "3 current replicas", |d| {
            d.len() == 3
                && d.iter().all(|(_, s)| s["config"]["num_replicas"] == 3)
                && d.iter().any(|(i, s)| {
                    s["cluster"]["leader"] == cluster.nodes[*i].name.as_str()
                        && s["cluster"]["replicas"]
                            .as_array()
                            .is_some_and(|r| r.len() == 2 && r.iter().all(|p| p["current"] == true))
                })
        });
    }
    // Nothing stored was lost by scaling up: the messages, read back from the servers.
    assert_eq!(cluster.messages("KILN"), Some(5));
    rt.block_on(async {
        let client = async_nats::connect(cluster.url(2)).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let stream = js.get_stream("KILN").await.unwrap();
        for (i, p) in payloads.iter().enumerate() {
            let m = stream.get_raw_message(i as u64 + 1).await.unwrap();
            assert_eq!(m.payload, p.as_bytes(), "message {}", i + 1);
        }
    });
    // The stage consumers followed the stream to three replicas.
    let consumers: Vec<serde_json::Value> = cluster
        .jsz(0, "consumers=true&config=true")
        .unwrap()["account_details"][0]["stream_detail"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["name"] == "KILN")
        .flat_map(|s| s["consumer_detail"].as_array().cloned().unwrap_or_default())
        .collect();
    assert_eq!(consumers.len(), 7, "{consumers:#?}");
    for c in &consumers {
        assert_eq!(
            c["cluster"]["replicas"].as_array().map(Vec::len),
            Some(2),
            "{c:#}"
        );
    }

    // Handed-on states are read through the leader (a replica may not yet hold the state a
    // `completed` message names), as the servers' own configuration says.
    let states = cluster.stream_details("KV_kiln-states");
    assert!(!states.is_empty());
    for (_, s) in &states {
        assert_eq!(s["config"]["allow_direct"].as_bool(), Some(false), "{s:#}");
    }

    // `kiln status --cluster` shows the same: three replicas and a leader for each.
    let o = kiln(home.path())
        .args(["status", "--cluster", "--json", "--nats", &cluster.urls()])
        .output()
        .unwrap();
    let report = common::json_report(&o);
    let streams = report["streams"].as_array().unwrap();
    assert_eq!(streams.len(), 5, "{report:#}");
    for s in streams {
        let name = s["stream"].as_str().unwrap();
        assert_eq!(s["replicas"], 3, "{s:#}");
        let leader = cluster.leader(name).map(|i| cluster.nodes[i].name.clone());
        assert_eq!(s["leader"].as_str(), leader.as_deref(), "{s:#}");
    }
    let o = kiln(home.path())
        .args(["status", "--cluster", "--nats", &cluster.url(1)])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("KILN             R3 leader n"),
        "{}",
        text(&o)
    );

    // A worker asking for one replica (as an operator's old setting, or a single-node habit)
    // leaves what has more alone, at start and while it runs.
    let wlog = home.path().join("worker.log");
    let worker = Running::spawn(
        {
            let mut c = kiln(home.path());
            c.args(["worker", "--replicas", "1", "--stages", "source"])
                .args(["--nats", &cluster.url(2)]);
            c
        },
        &wlog,
    );
    wait_for_log(&worker, "ready", Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(3));
    for name in ["KILN", KV, OBJ] {
        assert_eq!(cluster.replicas(name), Some(3), "{name}\n{}", worker.log());
    }
    assert!(!up.log().contains("ERROR"), "{}", up.log());
}

#[test]
fn no_quorum_is_said_clearly_and_builds_resume_when_a_node_returns() {
    let mut cluster = Cluster::start(3);
    let home = shared_home();
    let log = home.path().join("up.log");
    let up = up(home.path(), &cluster.urls(), &[], &log);
    wait_for_log(&up, "ready", Duration::from_secs(60));
    cluster.wait_for_stream("KILN", Duration::from_secs(30), "3 replicas", |d| {
        d.len() == 3
    });
    // A build before the fault: its history must survive.
    let before = format!("q-before-{}", std::process::id());
    let o = kiln(home.path())
        .args([
            "submit",
            "recipes/minimal.yaml",
            "--no-verify",
            "--follow",
            "--timeout",
            "600",
            "--json",
        ])
        .args(["--id", &before, "--nats", &cluster.urls()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}\n{}", text(&o), up.log());

    // Two of three nodes down: the third is up but no stream has a quorum.
    let survivor = 2;
    cluster.kill9(0);
    cluster.kill9(1);
    let url = cluster.url(survivor);
    let started = Instant::now();
    let o = kiln(home.path())
        .args([
            "submit",
            "recipes/minimal.yaml",
            "--no-verify",
            "--nats",
            &url,
        ])
        .output()
        .unwrap();
    let said = text(&o);
    eprintln!(
        "submit without quorum: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(!o.status.success(), "{said}");
    assert!(
        said.contains("no JetStream quorum for stream KILN"),
        "{said}"
    );
    assert!(
        !said.contains("panicked") && !said.contains("-js"),
        "{said}"
    );
    // The surviving node may have led KILN: it answers as leader until it notices, within
    // NATS's lost-quorum interval, that it lost its peers, and steps down. From then on a
    // listing read from its copy (which may be behind) is refused, not shown as current.
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let o = kiln(home.path())
            .args(["status", "--nats", &url])
            .output()
            .unwrap();
        if !o.status.success() {
            assert!(
                text(&o).contains("no JetStream quorum for stream KILN"),
                "{}",
                text(&o)
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "status still lists builds without a quorum:\n{}",
            text(&o)
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    let o = kiln(home.path())
        .args(["status", "--cluster", "--nats", &url])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    // A worker that starts now says so and exits.
    let o = kiln(home.path())
        .args(["worker", "--stages", "source", "--nats", &url])
        .output()
        .unwrap();
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("no JetStream quorum for stream"),
        "{}",
        text(&o)
    );
    assert!(!text(&o).contains("panicked"), "{}", text(&o));

    // The running workers say what they lack too.
    wait_for_log(
        &up,
        "no JetStream quorum for stream KILN",
        Duration::from_secs(30),
    );

    // One node back: a quorum again. The running `kiln up` goes on by itself.
    cluster.start_node(0);
    cluster.wait_for_meta_leader(Duration::from_secs(60));
    cluster.wait_for_stream("KILN", Duration::from_secs(60), "a leader", |_| true);
    // `kiln status --cluster` exits 0 once every stream of kiln's has a leader again.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let o = kiln(home.path())
            .args(["status", "--cluster", "--nats", &cluster.urls()])
            .output()
            .unwrap();
        if o.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{}
{}",
            text(&o),
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let o = kiln(home.path())
        .args(["status", &before, "--json", "--nats", &cluster.urls()])
        .output()
        .unwrap();
    let status = common::json_report(&o);
    assert!(
        status["stages"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["status"] == "completed"),
        "{status:#}"
    );
    let o = kiln(home.path())
        .args([
            "submit",
            "recipes/minimal.yaml",
            "--no-verify",
            "--follow",
            "--timeout",
            "600",
            "--json",
        ])
        .args([
            "--set",
            &common::unique_hostname("q"),
            "--nats",
            &cluster.urls(),
        ])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{}\n{}\n{}",
        text(&o),
        up.log(),
        cluster.logs()
    );
    let events = json_lines(&o);
    assert_eq!(events.last().unwrap()["stage"], "publish", "{}", text(&o));
    drop(up);
}

#[test]
fn a_build_runs_over_tls_and_a_wrong_ca_is_named() {
    let cluster = Cluster::start_tls(3);
    let certs = cluster.certs.as_ref().unwrap();
    let home = shared_home();
    let log = home.path().join("up.log");
    let up = up(home.path(), &cluster.urls(), &certs.client_args(), &log);
    wait_for_log(&up, "ready", Duration::from_secs(60));

    // Through the environment this time, as a CI job would set it.
    let o = kiln(home.path())
        .args([
            "submit",
            "recipes/minimal.yaml",
            "--no-verify",
            "--follow",
            "--timeout",
            "600",
            "--json",
        ])
        .args(["--set", &common::unique_hostname("tls")])
        .env("KILN_NATS_URL", cluster.urls())
        .env("KILN_NATS_TLS_CA", &certs.ca)
        .env("KILN_NATS_TLS_CERT", &certs.client_cert)
        .env("KILN_NATS_TLS_KEY", &certs.client_key)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}\n{}", text(&o), up.log());
    let events = json_lines(&o);
    let done: Vec<&str> = events
        .iter()
        .filter(|e| e["kind"] == "completed")
        .map(|e| e["stage"].as_str().unwrap())
        .collect();
    assert_eq!(
        done,
        [
            "source", "render", "rootfs", "kernel", "disk", "verify", "publish"
        ],
        "{}",
        text(&o)
    );
    // The servers saw TLS clients only: a plain connection is refused by the server itself.
    let plain = format!("nats://127.0.0.1:{}", cluster.nodes[0].port);
    let o = kiln(home.path())
        .args(["status", "--nats", &plain])
        .output()
        .unwrap();
    assert!(!o.status.success(), "{}", text(&o));

    // A client that trusts another CA: the error names the server and the certificate problem.
    let url = cluster.url(1);
    let o = kiln(home.path())
        .args(["status", "--nats", &url, "--nats-tls-ca"])
        .arg(&certs.other_ca)
        .arg("--nats-tls-cert")
        .arg(&certs.client_cert)
        .arg("--nats-tls-key")
        .arg(&certs.client_key)
        .output()
        .unwrap();
    let said = text(&o);
    assert_eq!(o.status.code(), Some(1), "{said}");
    assert!(said.contains(&url), "{said}");
    assert!(
        said.contains("certificate") && said.contains("does not verify"),
        "{said}"
    );
    assert!(said.to_lowercase().contains("unknownissuer"), "{said}");
    eprintln!("wrong CA: {said}");
    // No client certificate, right CA: the server refuses the handshake.
    let o = kiln(home.path())
        .args(["status", "--nats", &url, "--nats-tls-ca"])
        .arg(&certs.ca)
        .output()
        .unwrap();
    let said = text(&o);
    assert!(!o.status.success(), "{said}");
    assert!(
        said.contains("refused this client's TLS certificate"),
        "{said}"
    );
}

/// Every stage event of `build`, read from the stream (None while it cannot be read).
fn events(urls: &str, build: &str) -> Option<Vec<kiln::bus::StageEvent>> {
    common::rt().block_on(async {
        let bus = tokio::time::timeout(Duration::from_secs(5), kiln::bus::Bus::connect_url(urls))
            .await
            .ok()?
            .ok()?;
        let events = tokio::time::timeout(Duration::from_secs(20), bus.build_events(build))
            .await
            .ok()?
            .ok()?;
        Some(events.into_iter().filter_map(|e| e.event.ok()).collect())
    })
}

fn count(events: &[kiln::bus::StageEvent], kind: &str, stage: &str) -> usize {
    events
        .iter()
        .filter(|e| e.kind().name() == kind && e.stage().name() == stage)
        .count()
}

/// The object `name` of the `kiln-blobs` object store, read with the NATS client (not kiln).
fn object(url: &str, name: &str) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    common::rt().block_on(async {
        let client = async_nats::connect(url).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let store = js.get_object_store("kiln-blobs").await.unwrap();
        let mut object = store.get(name).await.unwrap();
        let mut bytes = Vec::new();
        object.read_to_end(&mut bytes).await.unwrap();
        bytes
    })
}

#[test]
fn stream_and_object_store_leaders_killed_mid_builds_lose_nothing() {
    let mut cluster = Cluster::start(3);
    let urls = cluster.urls();
    let home = shared_home();
    let log = home.path().join("up.log");
    let up = up(home.path(), &urls, &[], &log);
    wait_for_log(&up, "ready", Duration::from_secs(60));
    for name in ["KILN", OBJ] {
        cluster.wait_for_stream(name, Duration::from_secs(30), "3 replicas", |d| {
            d.len() == 3
        });
    }

    // Three builds with parameters no run used before, so every stage really runs.
    let tag = format!("{:x}", std::process::id());
    let sets: Vec<String> = (0..3)
        .map(|i| common::unique_hostname(&format!("f{i}-{tag}")))
        .collect();
    let ids: Vec<String> = (0..3).map(|i| format!("fault-{tag}-{i}")).collect();
    let submit = |i: usize| {
        let o = kiln(home.path())
            .args([
                "submit",
                "recipes/minimal.yaml",
                "--no-verify",
                "--id",
                &ids[i],
            ])
            .args(["--set", &sets[i], "--nats", &urls])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o));
    };
    // Two builds now; the third just before the second fault, so that one is surely under way
    // when it lands however fast this machine runs the first two.
    submit(0);
    submit(1);
    let logs = |cluster: &Cluster| format!("{}\n{}", up.log(), cluster.logs());
    let completed_stages = || -> usize {
        ids.iter()
            .filter_map(|id| events(&urls, id))
            .map(|ev| ev.iter().filter(|e| e.kind().name() == "completed").count())
            .sum()
    };
    let wait_progress = |cluster: &Cluster, past: usize, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let n = completed_stages();
            if n >= past {
                return n;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: {n} < {past}\n{}",
                logs(cluster)
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    };

    // The first build is under way: kill the node leading KILN.
    wait_progress(&cluster, 3, "first stages");
    let leader = cluster.leader("KILN").unwrap();
    eprintln!("SIGKILL {} (leads KILN)", cluster.nodes[leader].name);
    cluster.kill9(leader);
    let at_kill = completed_stages();
    // Builds go on without it: more stages complete.
    wait_progress(&cluster, at_kill + 3, "progress without the KILN leader");
    cluster.start_node(leader);
    cluster.wait_for_meta_leader(Duration::from_secs(60));

    // Then the node leading the object store's stream.
    submit(2);
    let obj_leader = cluster.leader(OBJ).unwrap();
    eprintln!("SIGKILL {} (leads {OBJ})", cluster.nodes[obj_leader].name);
    cluster.kill9(obj_leader);
    let total = 7 * ids.len();
    let at_kill = completed_stages();
    assert!(at_kill < total, "the builds ended before the second fault");
    wait_progress(&cluster, total, "every stage of every build");
    cluster.start_node(obj_leader);
    cluster.wait_for_meta_leader(Duration::from_secs(60));

    // The restarted nodes caught up: their copies of each stream hold what the leader holds.
    // (Checked before the events are read: a reader's consumer may sit on a restarted node.)
    for name in ["KILN", KV, OBJ] {
        cluster.wait_for_stream(name, Duration::from_secs(60), "copies equal", |d| {
            d.len() == 3
                && d.windows(2)
                    .all(|w| w[0].1["state"]["last_seq"] == w[1].1["state"]["last_seq"])
        });
    }

    // Each stage completed once per build, none failed.
    let mut images = Vec::new();
    for id in &ids {
        let ev = events(&urls, id).unwrap();
        for stage in kiln::bus::Stage::ALL {
            assert_eq!(
                count(&ev, "completed", stage.name()),
                1,
                "{id} {stage:?}: {ev:#?}"
            );
            assert_eq!(
                count(&ev, "failed", stage.name()),
                0,
                "{id} {stage:?}: {ev:#?}"
            );
        }
        let disk = completed(&ev, "disk");
        images.push(disk.outputs["disk"]["image"].as_str().unwrap().to_string());
    }

    // The first image is the one a build without any fault makes.
    let reference = reference_image(&sets[0]);
    // Every image, as the object store holds it, hashes to the digest its build announced.
    for (i, image) in images.iter().enumerate() {
        let bytes = object(&cluster.url(i % 3), image);
        let digest = format!("sha256:{}", common::sha256_bytes(&bytes));
        assert_eq!(&digest, image, "build {}", ids[i]);
    }
    assert_eq!(images[0], reference, "{}", logs(&cluster));
}

/// The `completed` event of `stage` in `events`.
fn completed<'a>(
    events: &'a [kiln::bus::StageEvent],
    stage: &str,
) -> &'a kiln::bus::StageCompleted {
    events
        .iter()
        .find_map(|e| match e {
            kiln::bus::StageEvent::Completed(c) if c.stage.name() == stage => Some(c),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no completed {stage}: {events:#?}"))
}

/// The qcow2 image `kiln build --no-verify` makes of recipes/minimal.yaml with `set`, on its
/// own private server and home: what a build without a cluster gives.
fn reference_image(set: &str) -> String {
    let home = shared_home();
    let out = home.path().join("out");
    let o = kiln(home.path())
        .args([
            "build",
            "recipes/minimal.yaml",
            "--no-verify",
            "--set",
            set,
            "-o",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let file = common::walk(&out)
        .into_iter()
        .find(|p| p.extension().is_some_and(|e| e == "qcow2"))
        .expect("a qcow2 image from kiln build");
    common::sha256_digest(&file)
}

#[test]
fn workers_on_two_hosts_in_network_namespaces_share_only_nats() {
    use common::netns::Netns;
    let host_a = Netns::new(0);
    let host_b = Netns::new(1);
    // The cluster's client ports listen on this side of A's pair; B reaches them through its
    // default route. Routes and monitoring stay on loopback, which the namespaces cannot see.
    let cluster = Cluster::start_with(3, false, &host_a.host_ip);
    let urls = cluster.urls();
    // The namespaces cannot reach the Debian mirror: a worker here fetches packages (rootfs,
    // kernel); the two hosts run the rest, each with an empty home of its own.
    let home = shared_home();
    let home_a = tempfile::tempdir().unwrap();
    let home_b = tempfile::tempdir().unwrap();
    let spawn = |mut c: std::process::Command, stages: &str, log: &Path| {
        c.args(["worker", "--nats", &urls, "--stages", stages])
            .args(common::recipe_roots());
        Running::spawn(c, log)
    };
    let a = spawn(
        host_a.kiln(home_a.path()),
        "source,render",
        &home_a.path().join("a.log"),
    );
    let b = spawn(
        host_b.kiln(home_b.path()),
        "disk,verify,publish",
        &home_b.path().join("b.log"),
    );
    let here = spawn(
        kiln(home.path()),
        "rootfs,kernel",
        &home.path().join("here.log"),
    );
    for w in [&a, &b, &here] {
        wait_for_log(w, "ready", Duration::from_secs(60));
    }

    let set = common::unique_hostname("ns");
    let o = kiln(home.path())
        .args([
            "submit",
            "recipes/minimal.yaml",
            "--no-verify",
            "--follow",
            "--timeout",
            "600",
            "--json",
        ])
        .args(["--set", &set, "--nats", &urls])
        .output()
        .unwrap();
    let logs = || format!("A:\n{}\nB:\n{}\nhere:\n{}", a.log(), b.log(), here.log());
    assert!(o.status.success(), "{}\n{}", text(&o), logs());
    let id = json_lines(&o)[0]["build"].as_str().unwrap().to_string();
    let ev = events(&urls, &id).unwrap();
    // Each stage ran where it was sent: the worker field ends with the process id.
    for (stages, worker) in [
        (&["source", "render"][..], &a),
        (&["rootfs", "kernel"][..], &here),
        (&["disk", "verify", "publish"][..], &b),
    ] {
        for stage in stages {
            let c = completed(&ev, stage);
            assert!(
                c.worker.ends_with(&format!("/{}", worker.pid())),
                "{stage} ran on {}",
                c.worker
            );
        }
    }
    // B built the disk from blobs it fetched through NATS alone, and made the image a build
    // without a cluster makes.
    let image = completed(&ev, "disk").outputs["disk"]["image"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(image, reference_image(&set), "{}", logs());
}

/// How many messages node `i` holds of stream `name` (its own copy, as its `/jsz` says).
fn messages_on(cluster: &Cluster, i: usize, name: &str) -> Option<u64> {
    let j = cluster.jsz(i, "streams=true")?;
    j["account_details"]
        .as_array()?
        .iter()
        .flat_map(|a| a["stream_detail"].as_array().cloned().unwrap_or_default())
        .find(|s| s["name"] == name)
        .and_then(|s| s["state"]["messages"].as_u64())
}

#[test]
fn object_store_node_killed_during_an_upload_leaves_no_record_without_its_blobs() {
    use common::jetstream::Nats;
    let mut cluster = Cluster::start(3);
    let urls = cluster.urls();
    // Two worker hosts, each with a `$KILN_HOME` of its own: `kiln up` and a `kiln worker`.
    let home_a = common::own_blobs_home(None);
    let home_b = common::own_blobs_home(None);
    let up = up(home_a.path(), &urls, &[], &home_a.path().join("up.log"));
    wait_for_log(&up, "ready", Duration::from_secs(60));
    let worker = Running::spawn(
        {
            let mut c = kiln(home_b.path());
            c.args(["worker", "--nats", &urls])
                .args(common::recipe_roots())
                .args(["--ack-wait", "3", "--max-deliver", "20"]);
            c
        },
        &home_b.path().join("worker.log"),
    );
    wait_for_log(&worker, "ready", Duration::from_secs(60));
    cluster.wait_for_stream(OBJ, Duration::from_secs(30), "3 replicas", |d| d.len() == 3);
    let logs = |cluster: &Cluster| {
        format!(
            "kiln up:\n{}\nkiln worker:\n{}\n{}",
            up.log(),
            worker.log(),
            cluster.logs()
        )
    };

    // Parameters no run used before: the disk stage really runs and uploads its image.
    let tag = format!("{:x}", std::process::id());
    let set = common::unique_hostname(&format!("upload-{tag}"));
    let submit = |id: &str| {
        let o = kiln(home_a.path())
            .args(["submit", "recipes/minimal.yaml", "--no-verify", "--id", id])
            .args(["--set", &set, "--nats", &urls])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o));
    };
    let first = format!("upload-{tag}-1");
    submit(&first);

    // Once the disk stage has started, the first chunk of its image reaching the object store's
    // leader is the moment to kill that node: the upload is under way.
    let deadline = Instant::now() + Duration::from_secs(300);
    let disk_started = || events(&urls, &first).is_some_and(|ev| count(&ev, "started", "disk") > 0);
    while !disk_started() {
        assert!(
            Instant::now() < deadline,
            "no disk stage\n{}",
            logs(&cluster)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let leader = cluster.leader(OBJ).unwrap();
    let before = messages_on(&cluster, leader, OBJ).unwrap();
    loop {
        let now = messages_on(&cluster, leader, OBJ).unwrap_or(before);
        if now > before {
            eprintln!(
                "SIGKILL {} (leads {OBJ}) with {} chunks of the upload stored",
                cluster.nodes[leader].name,
                now - before
            );
            break;
        }
        let ev = events(&urls, &first).unwrap_or_default();
        assert_eq!(
            count(&ev, "completed", "disk"),
            0,
            "the upload ended before it was seen"
        );
        assert!(Instant::now() < deadline, "no upload\n{}", logs(&cluster));
        std::thread::sleep(Duration::from_millis(20));
    }
    cluster.kill9(leader);

    // The build completes on the two nodes left; each stage once.
    let wait_done = |cluster: &Cluster, id: &str| -> Vec<kiln::bus::StageEvent> {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            if let Some(ev) = events(&urls, id)
                && (count(&ev, "completed", "publish") > 0
                    || ev.iter().any(|e| e.kind().name() == "failed"))
            {
                return ev;
            }
            assert!(
                Instant::now() < deadline,
                "{id} did not end\n{}",
                logs(cluster)
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    };
    let ev = wait_done(&cluster, &first);
    for stage in kiln::bus::Stage::ALL {
        assert_eq!(
            count(&ev, "completed", stage.name()),
            1,
            "{stage:?}: {ev:#?}"
        );
        assert_eq!(count(&ev, "failed", stage.name()), 0, "{stage:?}: {ev:#?}");
    }
    let image = completed(&ev, "disk").outputs["disk"]["image"]
        .as_str()
        .unwrap()
        .to_string();
    cluster.start_node(leader);
    cluster.wait_for_meta_leader(Duration::from_secs(60));
    cluster.wait_for_stream(OBJ, Duration::from_secs(60), "copies equal", |d| {
        d.len() == 3
            && d.windows(2)
                .all(|w| w[0].1["state"]["last_seq"] == w[1].1["state"]["last_seq"])
    });

    // Every shared record names only blobs the object store holds (asked with the NATS client).
    let nats = Nats::connect(&cluster.url(leader));
    let records = nats.stage_records();
    assert!(!records.is_empty());
    let mut checked = 0;
    for (key, value) in &records {
        for digest in digests_in(value) {
            assert!(
                nats.has_object(&digest),
                "record {key} names {digest}, which the object store does not hold: {value:#}"
            );
            checked += 1;
        }
    }
    eprintln!("{} records name {checked} blobs, all held", records.len());
    assert!(nats.has_object(&image));

    // A later build with the same inputs, on whichever host: the same image, held and whole.
    let second = format!("upload-{tag}-2");
    submit(&second);
    let ev = wait_done(&cluster, &second);
    for stage in kiln::bus::Stage::ALL {
        assert_eq!(
            count(&ev, "completed", stage.name()),
            1,
            "{stage:?}: {ev:#?}"
        );
    }
    let again = completed(&ev, "disk").outputs["disk"]["image"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(again, image, "{}", logs(&cluster));
    let bytes = object(&cluster.url(leader), &image);
    assert_eq!(format!("sha256:{}", common::sha256_bytes(&bytes)), image);
    // And it is the image a build without a cluster makes.
    assert_eq!(image, reference_image(&set), "{}", logs(&cluster));
}

/// Every `sha256:<hex>` string in a JSON value.
fn digests_in(v: &serde_json::Value) -> Vec<String> {
    match v {
        serde_json::Value::String(s)
            if s.len() == 71
                && s.starts_with("sha256:")
                && s[7..].bytes().all(|b| b.is_ascii_hexdigit()) =>
        {
            vec![s.clone()]
        }
        serde_json::Value::Array(a) => a.iter().flat_map(digests_in).collect(),
        serde_json::Value::Object(m) => m.values().flat_map(digests_in).collect(),
        _ => Vec::new(),
    }
}
