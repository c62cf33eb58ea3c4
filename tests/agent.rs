//! The publish stage and `kiln agent`, end to end, with real components only: Debian's
//! `docker-registry` on a loopback port, a private `nats-server`, `kiln up` building and
//! publishing through NATS, real QEMU (the agent boots the images through OVMF), `curl` and
//! `sha256sum` as the second opinion on what the registry holds.
//!
//! One test walks the whole life of an application so the VM boots stay few: a build publishes
//! v1 → the agent deploys it → v2 is built and swapped in → v3 (verified, but its application
//! never comes up) is rolled back → an image signed by another key, and one signed with the
//! trusted key but published outside the pipeline (no boot attestation), are refused without
//! booting (the changed-after-signing disk is refused by `kiln pull`) → the agent is killed and restarted and re-adopts the
//! running VM.

use kiln::bus::{Bus, EventTime, ImagePublished, PrivateServer};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

mod common;
use common::agents::{Agent, VmReaper, page, qemus_in, show, submit};
use common::metrics::{checked_metrics, sample};
use common::registry::start_registry;
use common::{Running, curl, free_port, kiln, rt, sha256_digest, shared_home};

/// Announce an image the way the publish stage does (a CI system may do the same).
fn announce(url: &str, repository: &str, publish: &serde_json::Value, build: &str) {
    let msg = ImagePublished {
        v: 1,
        build: build.into(),
        repository: repository.into(),
        reference: publish["reference"].as_str().unwrap().into(),
        digest: publish["manifest_digest"].as_str().unwrap().into(),
        tags: vec!["latest".into()],
        signature: None,
        verification: serde_json::Value::Null,
        promotion: None,
        time: EventTime::now(),
    };
    rt().block_on(async {
        let bus = Bus::connect_url(url).await.unwrap();
        bus.publish_image(&msg).await.unwrap();
    });
}

#[test]
fn a_build_is_published_then_deployed_swapped_rolled_back_refused_and_readopted() {
    let home = shared_home();
    let work = tempfile::tempdir().unwrap();
    let reg = start_registry(None);
    let host = format!("127.0.0.1:{}", reg.port);
    let repository = format!("{host}/kiln/app");
    let server = PrivateServer::start().unwrap();
    let url = server.url();
    let key = work.path().join("images.key");
    let evil = work.path().join("evil.key");
    for k in [&key, &evil] {
        let o = kiln(home.path())
            .args(["keygen", "-o"])
            .arg(k)
            .output()
            .unwrap();
        assert!(o.status.success());
    }
    let trust = work.path().join("images.key.pub");

    // --- The publish stage: kiln up --publish-to, a build of a recipe with publish:.
    let up_log = work.path().join("up.log");
    let _up = {
        let mut c = kiln(home.path());
        c.args(["up", "--nats", &url, "--publish-to", &host, "--key"])
            .arg(&key)
            .args(common::recipe_roots())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&up_log).unwrap());
        Running::new(c.spawn().unwrap())
    };
    let events = submit(home.path(), &url, &["release=1"], &up_log);
    let build1 = events[0]["build"].as_str().unwrap().to_string();
    let published = events.last().unwrap();
    let out = &published["outputs"];
    let reference = out["reference"].as_str().unwrap();
    let manifest = out["manifest"].as_str().unwrap();
    let layer = out["layer"].as_str().unwrap();
    assert!(
        reference.starts_with(&format!("{repository}:latest@sha256:")),
        "{published}"
    );
    assert!(out["uploaded"].as_u64().unwrap() > 0, "{published}");
    assert!(out["signature"].as_str().unwrap().starts_with("sha256:"));
    // The disk stage made the layer that was pushed.
    let disk = events
        .iter()
        .find(|e| e["kind"] == "completed" && e["stage"] == "disk")
        .unwrap();
    assert!(disk["outputs"].to_string().contains(layer), "{disk}");

    // The registry's own API lists the tag (and the signature tag).
    let tags: serde_json::Value = serde_json::from_slice(&curl(&[
        "-m",
        "30",
        &format!("http://{host}/v2/kiln/app/tags/list"),
    ]))
    .unwrap();
    let tags: Vec<&str> = tags["tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert!(tags.contains(&"latest"), "{tags:?}");
    let hex = manifest.strip_prefix("sha256:").unwrap();
    assert!(
        tags.contains(&format!("sha256-{hex}.sig").as_str()),
        "{tags:?}"
    );
    // curl sees the manifest (with kiln's annotations) and the blob.
    let m = curl(&[
        "-m",
        "30",
        "-H",
        "Accept: application/vnd.oci.image.manifest.v1+json",
        &format!("http://{host}/v2/kiln/app/manifests/latest"),
    ]);
    let mv: serde_json::Value = serde_json::from_slice(&m).unwrap();
    assert_eq!(mv["layers"][0]["digest"], layer, "{mv}");
    assert_eq!(mv["artifactType"], "application/vnd.kiln.disk.v1");
    let ann = &mv["annotations"];
    for k in [
        "dev.kiln.recipe.digest",
        "dev.kiln.boot.report",
        "dev.kiln.version",
        "dev.kiln.deploy",
    ] {
        assert!(ann[k].is_string(), "{k} missing: {mv}");
    }
    assert!(
        ann["dev.kiln.boot.report"]
            .as_str()
            .unwrap()
            .contains("direct")
    );
    let curled = work.path().join("curl.blob");
    curl(&[
        "-m",
        "30",
        "-o",
        curled.to_str().unwrap(),
        &format!("http://{host}/v2/kiln/app/blobs/{layer}"),
    ]);
    assert_eq!(sha256_digest(&curled), layer);
    // kiln pull --trust gets the same bytes.
    let v1_file = work.path().join("v1.qcow2");
    let o = kiln(home.path())
        .args(["pull", reference, "-o"])
        .arg(&v1_file)
        .arg("--trust")
        .arg(&trust)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", show(&o, &up_log));
    assert_eq!(sha256_digest(&v1_file), layer);
    assert_eq!(
        std::fs::read(&v1_file).unwrap(),
        std::fs::read(&curled).unwrap()
    );
    // The announcement is on the stream.
    let announced = rt().block_on(async {
        let bus = Bus::connect_url(&url).await.unwrap();
        bus.stored_messages("kiln.image.published.>").await.unwrap()
    });
    let last = announced.last().unwrap();
    let (subject, payload) = (&last.subject, &last.payload);
    assert_eq!(
        subject,
        &format!(
            "kiln.image.published.{}",
            kiln::bus::subjects::sanitize_token(&repository)
        )
    );
    let msg: ImagePublished = kiln::bus::decode(payload).unwrap();
    assert_eq!(
        (msg.build.as_str(), msg.reference.as_str()),
        (build1.as_str(), reference)
    );
    // The same build again: every stage a hit, the same digest, no disk bytes pushed.
    let again = submit(home.path(), &url, &["release=1"], &up_log);
    let p2 = &again.last().unwrap()["outputs"];
    assert_eq!(p2["manifest"], manifest);
    assert_eq!(p2["uploaded"], 0, "{p2}");
    // The agent deploys the last announcement: this second build's.
    let build1 = again[0]["build"].as_str().unwrap().to_string();

    // --- The agent: at start it takes the last announcement of its tag (v1).
    let state = work.path().join("agent-state");
    let _reaper = VmReaper(state.clone());
    let listen = free_port();
    let metrics_port = free_port();
    let agent_log = work.path().join("agent.log");
    let agent_cmd = || {
        let mut c = kiln(home.path());
        c.args([
            "agent",
            "--nats",
            &url,
            "--name",
            "hv-test",
            "--watch",
            &format!("{repository}:latest"),
            "--listen",
            &format!("127.0.0.1:{listen}"),
            "--metrics",
            &metrics_port.to_string(),
            "--json",
            "--group",
            "web",
            "--heartbeat-interval",
            "1",
            "--trust",
        ])
        .arg(&trust)
        // The verify stage of `kiln up` signs its boot attestations with this key.
        .arg("--trust-verifier")
        .arg(home.path().join("verifier.key.pub"))
        .arg("--state-dir")
        .arg(&state);
        c
    };
    let boot = Duration::from_secs(240);
    let mut agent = Agent::start(agent_cmd(), &agent_log);
    let ready = agent.next("ready", Duration::from_secs(30));
    assert!(ready["running"].is_null(), "{ready}");
    let v1 = agent.next("completed", boot);
    assert_eq!(v1["reference"].as_str().unwrap(), msg.reference, "{v1}");
    assert_eq!(v1["build"], build1.as_str());
    let v1_pid = v1["vm"]["pid"].as_u64().unwrap() as u32;
    assert_eq!(qemus_in(&state), vec![v1_pid]);
    assert!(page(listen).contains("kiln-app release 1"));
    // kiln status shows where the build runs.
    let o = kiln(home.path())
        .args(["status", &build1, "--json", "--nats", &url])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", show(&o, &up_log));
    let status: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let stages = status["stages"].as_array().unwrap();
    assert_eq!(stages.last().unwrap()["stage"], "publish", "{status}");
    let deployments = status["deployments"].as_array().unwrap();
    assert!(
        deployments
            .iter()
            .any(|d| d["agent"] == "hv-test" && d["kind"] == "completed"),
        "{status}"
    );

    // --- v2: built and published through NATS, swapped in; v1's VM is stopped.
    let v2_events = submit(home.path(), &url, &["release=2"], &up_log);
    let v2_ref = v2_events.last().unwrap()["outputs"]["reference"]
        .as_str()
        .unwrap()
        .to_string();
    let v2 = agent.next("completed", boot);
    assert_eq!(v2["reference"].as_str().unwrap(), v2_ref, "{v2}");
    assert_eq!(v2["previous"].as_str().unwrap(), msg.reference);
    let v2_pid = v2["vm"]["pid"].as_u64().unwrap() as u32;
    assert_eq!(qemus_in(&state), vec![v2_pid], "v1's VM must be gone");
    assert!(page(listen).contains("kiln-app release 2"));
    // v2 came as a delta: rebuilt from v1's chunks plus the few that changed, as the deploy
    // message on the stream says; v1 came whole.
    let pulls: Vec<serde_json::Value> = rt().block_on(async {
        let bus = Bus::connect_url(&url).await.unwrap();
        bus.stored_messages("kiln.deploy.hv-test.completed")
            .await
            .unwrap()
            .iter()
            .map(|m| {
                serde_json::from_slice::<serde_json::Value>(&m.payload).unwrap()["pull"].clone()
            })
            .collect()
    });
    let (whole, delta) = (&pulls[0], &pulls[1]);
    assert_eq!(whole["chunks"], 0, "{pulls:?}");
    assert_eq!(whole["fetched_bytes"], whole["bytes"], "{pulls:?}");
    let bytes = delta["bytes"].as_u64().unwrap();
    assert!(delta["chunks"].as_u64().unwrap() > 0, "{pulls:?}");
    assert!(
        delta["fetched_bytes"].as_u64().unwrap() * 10 < bytes,
        "{pulls:?}"
    );
    assert!(
        delta["reused_bytes"].as_u64().unwrap() * 2 > bytes,
        "{pulls:?}"
    );
    // The inventory: hv-test in group web, healthy, running v2 in the VM whose pid QEMU has.
    let o = kiln(home.path())
        .args(["agents", "--group", "web", "--json", "--nats", &url])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", show(&o, &agent_log));
    let inv: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let me = &inv["agents"][0];
    assert_eq!(me["agent"], "hv-test", "{inv}");
    assert_eq!(me["state"], "healthy", "{inv}");
    assert_eq!(me["running"].as_str().unwrap(), v2_ref, "{inv}");
    assert_eq!(me["previous"].as_str().unwrap(), msg.reference, "{inv}");
    assert_eq!(me["pid"].as_u64().unwrap() as u32, v2_pid, "{inv}");
    assert_eq!(me["listen"], format!("127.0.0.1:{listen}"), "{inv}");
    // The stream's history of its heartbeats: each change once, the deploys included.
    let mut history: Vec<(String, Option<String>)> = rt().block_on(async {
        let bus = Bus::connect_url(&url).await.unwrap();
        bus.stored_messages("kiln.agent.hv-test.heartbeat")
            .await
            .unwrap()
            .iter()
            .map(|m| {
                let hb: kiln::bus::AgentHeartbeat = kiln::bus::decode(&m.payload).unwrap();
                (hb.health.name().to_string(), hb.deploying.or(hb.running))
            })
            .collect()
    });
    // (Its first beat may come before or after it took up v1.)
    if history.first().is_some_and(|(h, _)| h == "idle") {
        history.remove(0);
    }
    let v1_ref = Some(msg.reference.clone());
    let v2_some = Some(v2_ref.clone());
    assert_eq!(
        history,
        [
            ("deploying".to_string(), v1_ref.clone()),
            ("healthy".to_string(), v1_ref),
            ("deploying".to_string(), v2_some.clone()),
            ("healthy".to_string(), v2_some),
        ],
        "heartbeats on the stream"
    );

    // --- v3: boot-verified (its init prints the marker), but its application never comes up
    // under the agent: rolled back, v2 keeps running, and the message says why.
    let v3_events = submit(home.path(), &url, &["release=3", "serve=false"], &up_log);
    let v3_ref = v3_events.last().unwrap()["outputs"]["reference"]
        .as_str()
        .unwrap()
        .to_string();
    let v3 = agent.next("failed", boot);
    assert_eq!(v3["reference"].as_str().unwrap(), v3_ref, "{v3}");
    assert_eq!(v3["rolled_back"], true, "{v3}");
    assert_eq!(v3["running"].as_str().unwrap(), v2_ref, "{v3}");
    let why = v3["error"]["message"].as_str().unwrap();
    assert!(why.contains("not healthy"), "{why}");
    assert!(why.contains("exited"), "{why}");
    assert!(why.contains("app-broken"), "{why}");
    assert_eq!(qemus_in(&state), vec![v2_pid]);
    assert!(page(listen).contains("kiln-app release 2"));

    // The agent's /metrics (promtool-checked): two deployments, one failed and rolled back, and
    // v2 running.
    let text = checked_metrics(&format!("http://127.0.0.1:{metrics_port}/metrics"));
    let count = |series: &str| sample(&text, series).unwrap_or(0.0);
    assert_eq!(
        count("kiln_agent_deployments_total{agent=\"hv-test\",result=\"completed\"}"),
        2.0,
        "{text}"
    );
    assert_eq!(
        count("kiln_agent_deployments_total{agent=\"hv-test\",result=\"failed\"}"),
        1.0,
        "{text}"
    );
    assert_eq!(
        count("kiln_agent_rollbacks_total{agent=\"hv-test\"}"),
        1.0,
        "{text}"
    );
    let v2_digest = v2_ref.rsplit_once('@').unwrap().1;
    let info = format!(
        "kiln_agent_image_info{{agent=\"hv-test\",reference=\"{v2_ref}\",digest=\"{v2_digest}\"}}"
    );
    assert_eq!(sample(&text, &info), Some(1.0), "{text}");

    // --- Signed by a key the agent does not trust: refused, nothing booted.
    let publish = |file: &Path, k: &Path, recipe: &str| -> serde_json::Value {
        let o = kiln(home.path())
            .args(["publish"])
            .arg(file)
            .args([
                "--to",
                &format!("{repository}:latest"),
                "--recipe",
                recipe,
                "--json",
                "--key",
            ])
            .arg(k)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", show(&o, &up_log));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let evil_pub = publish(&v1_file, &evil, "evil");
    announce(&url, &repository, &evil_pub, "evil-build");
    let refused = agent.next("failed", Duration::from_secs(60));
    let why = refused["error"]["message"].as_str().unwrap();
    assert!(why.contains("nothing was booted"), "{why}");
    assert!(why.contains("by the trusted key"), "{why}");
    assert_eq!(refused["rolled_back"], false);
    assert_eq!(refused["running"].as_str().unwrap(), v2_ref);
    assert_eq!(qemus_in(&state), vec![v2_pid]);

    // --- Changed after signing: the disk blob in the registry's storage is altered.
    let tampered = publish(&v1_file, &key, "tampered");
    let data = reg
        .root
        .path()
        .join("data/docker/registry/v2/blobs/sha256")
        .join(&layer[7..9])
        .join(&layer[7..])
        .join("data");
    let mut bytes = std::fs::read(&data).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x5a;
    std::fs::write(&data, &bytes).unwrap();
    let o = kiln(home.path())
        .args(["pull", tampered["reference"].as_str().unwrap(), "-o"])
        .arg(work.path().join("tampered.qcow2"))
        .arg("--trust")
        .arg(&trust)
        .output()
        .unwrap();
    assert!(!o.status.success(), "kiln pull accepted a changed blob");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("expected digest"),
        "{}",
        show(&o, &up_log)
    );
    // Signed with the trusted key but published outside the pipeline: no boot attestation, so
    // the agent refuses it before fetching the disk, and says which requirement failed.
    announce(&url, &repository, &tampered, "tampered-build");
    let refused = agent.next("failed", Duration::from_secs(60));
    let why = refused["error"]["message"].as_str().unwrap();
    assert!(why.contains("nothing was booted"), "{why}");
    assert!(why.contains("required boot is missing"), "{why}");
    assert_eq!(qemus_in(&state), vec![v2_pid]);
    assert!(page(listen).contains("kiln-app release 2"));

    // --- Channels: v2 promoted to `stable` once its signature and boot attestation verify;
    // the registry has the tag on v2's manifest, the stream an announcement saying who did it;
    // the image without a boot attestation is refused and the channel stays where it was.
    let promote = |reference: &str| {
        kiln(home.path())
            .args(["promote", reference, "--channel", "stable", "--json"])
            .args(["--nats", &url, "--trust"])
            .arg(&trust)
            .arg("--trust-verifier")
            .arg(home.path().join("verifier.key.pub"))
            .output()
            .unwrap()
    };
    let stable_digest = || {
        let m = curl(&[
            "-m",
            "30",
            "-H",
            "Accept: application/vnd.oci.image.manifest.v1+json",
            &format!("http://{host}/v2/kiln/app/manifests/stable"),
        ]);
        format!("sha256:{}", common::sha256_bytes(&m))
    };
    let o = promote(&format!("{repository}@{v2_digest}"));
    assert!(o.status.success(), "{}", show(&o, &up_log));
    let promoted: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        promoted["promoted"],
        format!("{repository}:stable@{v2_digest}"),
        "{promoted}"
    );
    assert_eq!(stable_digest(), v2_digest);
    let announced: ImagePublished = rt().block_on(async {
        let bus = Bus::connect_url(&url).await.unwrap();
        let all = bus.stored_messages("kiln.image.published.>").await.unwrap();
        kiln::bus::decode(&all.last().unwrap().payload).unwrap()
    });
    assert_eq!(announced.tags, ["stable"]);
    assert_eq!(announced.digest, v2_digest);
    let promotion = announced.promotion.expect("who promoted it");
    assert_eq!(promotion.channel, "stable");
    assert_eq!(promotion.from, format!("{repository}@{v2_digest}"));
    assert!(promotion.by.contains('@'), "{}", promotion.by);
    let unattested = tampered["manifest_digest"].as_str().unwrap();
    let o = promote(&format!("{repository}@{unattested}"));
    assert!(!o.status.success(), "{}", show(&o, &up_log));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("refused to promote")
            && err.contains("boot is missing")
            && err.contains("nothing moved"),
        "{err}"
    );
    assert_eq!(stable_digest(), v2_digest);
    // A tag is not enough: the image is named by digest.
    let o = promote(&format!("{repository}:latest"));
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("by digest"),
        "{}",
        show(&o, &up_log)
    );
    // The agent follows `latest`: the `stable` announcement is not for it.
    assert!(
        agent.lines.recv_timeout(Duration::from_secs(3)).is_err(),
        "the agent acted on another channel"
    );

    // --- kill -9 the agent, start it again: the running VM is adopted, not duplicated.
    agent.proc.kill9();
    assert_eq!(qemus_in(&state), vec![v2_pid], "the VM outlives the agent");
    let agent = Agent::start(agent_cmd(), &agent_log);
    let ready = agent.next("ready", Duration::from_secs(60));
    assert_eq!(ready["pid"].as_u64().unwrap() as u32, v2_pid, "{ready}");
    assert_eq!(ready["running"].as_str().unwrap(), v2_ref);
    // Nothing else happens: the last announcement was handled already.
    assert!(
        agent.lines.recv_timeout(Duration::from_secs(5)).is_err(),
        "the restarted agent acted again"
    );
    assert_eq!(qemus_in(&state), vec![v2_pid]);
    assert!(page(listen).contains("kiln-app release 2"));

    // --- A forged announcement of a known digest (v1's), pointing elsewhere, is refused; it
    // cannot keep the valid announcement of that digest from deploying afterwards.
    bytes[mid] ^= 0x5a; // v1's layer as it was signed again
    std::fs::write(&data, &bytes).unwrap();
    let mut forged = msg.clone();
    forged.reference = forged.reference.replace("/kiln/app", "/kiln/elsewhere");
    forged.build = "forged".into();
    forged.time = EventTime::now();
    rt().block_on(async {
        let bus = Bus::connect_url(&url).await.unwrap();
        bus.publish_image(&forged).await.unwrap();
    });
    let refused = agent.next("failed", Duration::from_secs(60));
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("nothing was booted"),
        "{refused}"
    );
    let mut again = msg.clone();
    again.time = EventTime::now();
    rt().block_on(async {
        let bus = Bus::connect_url(&url).await.unwrap();
        bus.publish_image(&again).await.unwrap();
    });
    let v1_again = agent.next("completed", boot);
    assert_eq!(v1_again["reference"].as_str().unwrap(), msg.reference);
    assert!(page(listen).contains("kiln-app release 1"));
    drop(agent);
    drop(server);
}
