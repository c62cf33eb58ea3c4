//! Rollouts over a fleet, end to end, with real components only: three `kiln agent`s in one
//! group on this machine (each its own state directory, stable address and QEMU VM; one boots
//! with the `direct` profile, the kernel and initrd read out of the image's ESP), Debian's
//! `docker-registry`, a private `nats-server`, `kiln up` building and publishing, and
//! `kiln controller` processes that are killed with SIGKILL. What the agents run is read back
//! from their stable addresses (the page each VM serves) and from the stream.
//!
//! One test walks the fleet's life so the boots stay few: v1 promoted to `stable` reaches the
//! three agents → a rollout of v2 in waves 1,1,1 reaches them in order while clients hammering
//! each stable address see no failed request → a rollout of v3 (verified, but its application
//! never comes up) halts after the first wave, that host back on v2 and the other two never
//! asked → a rollout of v1 whose controller is killed between two waves is taken over by a
//! second controller, and no host deploys twice → v1 is revoked while all run it: each goes
//! back to v2, and v1 is refused from then on.

use kiln::bus::{Bus, DeployCompleted, Rollout};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

mod common;
use common::agents::{Agent, VmReaper, page, qemus_in, show, submit, try_page};
use common::registry::start_registry;
use common::{Running, free_port, kiln, rt, shared_home};

const AGENTS: [&str; 3] = ["hv-a", "hv-b", "hv-c"];

/// Requests through an agent's stable address, all the time, counting the ones that fail.
struct Clients {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<std::sync::Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Clients {
    fn start(ports: &[u16]) -> Clients {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(std::sync::Mutex::new(Vec::new()));
        let threads = ports
            .iter()
            .map(|&port| {
                let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let text = try_page(port).unwrap_or_else(|e| e.to_string());
                        if text.contains("kiln-app release") {
                            ok.fetch_add(1, Ordering::Relaxed);
                        } else {
                            failed
                                .lock()
                                .unwrap()
                                .push(format!("port {port}: {text:?}"));
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                })
            })
            .collect();
        Clients {
            stop,
            ok,
            failed,
            threads,
        }
    }

    /// Stop; (requests answered, failures).
    fn stop(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        let failed = self.failed.lock().unwrap().clone();
        (self.ok.load(Ordering::Relaxed), failed)
    }
}

fn rollout_status(home: &std::path::Path, url: &str, id: &str) -> Rollout {
    let o = kiln(home)
        .args(["rollout", "status", id, "--json", "--nats", url])
        .output()
        .unwrap();
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&o.stderr)))
}

/// The deploy results on the stream that answer orders of rollout `id`, per agent.
fn answers_of(url: &str, id: &str) -> Vec<DeployCompleted> {
    rt().block_on(async {
        let bus = Bus::connect_url(url).await.unwrap();
        bus.stored_messages("kiln.deploy.*.completed")
            .await
            .unwrap()
            .iter()
            .filter_map(|m| kiln::bus::decode::<DeployCompleted>(&m.payload).ok())
            .filter(|c| {
                c.order
                    .as_deref()
                    .is_some_and(|o| o.starts_with(&format!("{id}.")))
            })
            .collect()
    })
}

#[test]
fn a_rollout_goes_wave_by_wave_halts_on_a_bad_image_and_outlives_its_controller() {
    let home = shared_home();
    let work = tempfile::tempdir().unwrap();
    let reg = start_registry(None);
    let host = format!("127.0.0.1:{}", reg.port);
    let repository = format!("{host}/kiln/app");
    let server = kiln::bus::PrivateServer::start().unwrap();
    let url = server.url();
    let key = work.path().join("images.key");
    common::keygen(home.path(), &key);
    let trust = work.path().join("images.key.pub");
    let verifier = home.path().join("verifier.key.pub");

    // kiln up builds and publishes; the rollouts get controllers of their own below.
    let up_log = work.path().join("up.log");
    let _up = {
        let mut c = kiln(home.path());
        c.args(["up", "--no-controller", "--listen", "none", "--nats", &url])
            .args(["--publish-to", &host, "--key"])
            .arg(&key)
            .args(common::recipe_roots())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&up_log).unwrap());
        Running::new(c.spawn().unwrap())
    };
    let digest_of = |sets: &[&str]| -> String {
        let events = submit(home.path(), &url, sets, &up_log);
        events.last().unwrap()["outputs"]["manifest"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let v1 = digest_of(&["release=1"]);
    let v2 = digest_of(&["release=2"]);
    let v3 = digest_of(&["release=3", "serve=false"]);

    // v1 becomes `stable`, which the three agents follow.
    let o = kiln(home.path())
        .args([
            "promote",
            &format!("{repository}@{v1}"),
            "--channel",
            "stable",
        ])
        .args(["--nats", &url, "--trust"])
        .arg(&trust)
        .arg("--trust-verifier")
        .arg(&verifier)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", show(&o, &up_log));
    let mut agents = Vec::new();
    let mut ports = Vec::new();
    let mut _reapers = Vec::new();
    for name in AGENTS {
        let state: PathBuf = work.path().join(name);
        _reapers.push(VmReaper(state.clone()));
        let port = free_port();
        let mut c = kiln(home.path());
        c.args(["agent", "--nats", &url, "--name", name, "--json"])
            .args(["--watch", &format!("{repository}:stable")])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--group", "web", "--heartbeat-interval", "1", "--trust"])
            .arg(&trust)
            .arg("--trust-verifier")
            .arg(&verifier)
            .arg("--state-dir")
            .arg(&state);
        if name == "hv-c" {
            // The fast option for test fleets: the kernel and initrd of the image's boot entry.
            c.args(["--profile", "direct"]);
        }
        let agent = Agent::start(c, &work.path().join(format!("{name}.log")));
        agent.next("ready", Duration::from_secs(30));
        agents.push(agent);
        ports.push(port);
    }
    let boot = Duration::from_secs(240);
    for (a, port) in agents.iter().zip(&ports) {
        let done = a.next("completed", boot);
        assert!(done["reference"].as_str().unwrap().ends_with(&v1), "{done}");
        assert!(page(*port).contains("kiln-app release 1"));
        // hv-c's QEMU boots the kernel itself; the others go through OVMF.
        let pid = done["vm"]["pid"].as_u64().unwrap();
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        let cmdline = String::from_utf8_lossy(&cmdline);
        let direct = done["agent"] == "hv-c";
        assert_eq!(cmdline.contains("\0-kernel\0"), direct, "{done}: {cmdline}");
        assert_eq!(cmdline.contains("pflash"), !direct, "{done}: {cmdline}");
    }

    let controller = |name: &str| {
        let mut c = kiln(home.path());
        c.args(["controller", "--nats", &url, "--name", name])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(work.path().join(format!("{name}.log"))).unwrap());
        Running::new(c.spawn().unwrap())
    };
    let rollout = |digest: &str, bake: &str, follow: bool| {
        let mut c = kiln(home.path());
        c.args([
            "rollout",
            &format!("{repository}@{digest}"),
            "--group",
            "web",
        ])
        .args(["--waves", "1,1,1", "--bake", bake, "--json", "--nats", &url]);
        if follow {
            c.args(["--follow"]);
        }
        c.output().unwrap()
    };
    let last_line = |o: &std::process::Output| -> Rollout {
        let text = String::from_utf8_lossy(&o.stdout);
        let line = text.lines().last().unwrap_or_default();
        serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {}", show(o, &up_log)))
    };

    // --- v2 in waves of one host: each wave deploys and bakes before the next is asked, and
    // the clients of the stable addresses see every request answered.
    let mut first = controller("ctl-1");
    let clients = Clients::start(&ports);
    let started = Instant::now();
    let o = rollout(&v2, "2", true);
    assert!(o.status.success(), "{}", show(&o, &up_log));
    let done = last_line(&o);
    assert_eq!(done.state, kiln::bus::RolloutState::Completed, "{done:?}");
    assert_eq!(done.plan, [["hv-a"], ["hv-b"], ["hv-c"]]);
    let hosts = &done.hosts;
    for w in hosts.windows(2) {
        // The next wave was asked only after the last one answered and baked for 2 s.
        let answered = w[0].answered_ms.unwrap();
        let ordered = w[1].ordered_ms.unwrap();
        assert!(ordered >= answered + 2000, "{done:?}");
    }
    for (a, port) in agents.iter().zip(&ports) {
        let c = a.next("completed", boot);
        assert!(c["reference"].as_str().unwrap().ends_with(&v2), "{c}");
        assert!(c["order"].as_str().unwrap().starts_with(&done.id), "{c}");
        assert!(page(*port).contains("kiln-app release 2"));
    }
    let (answered, failed) = clients.stop();
    assert!(
        failed.is_empty(),
        "failed requests during the rollout: {failed:?}"
    );
    assert!(
        answered > 30,
        "{answered} requests in {:?}",
        started.elapsed()
    );
    let o = kiln(home.path())
        .args(["agents", "--group", "web", "--json", "--nats", &url])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", show(&o, &up_log));
    let listed: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let digests: Vec<&str> = listed["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["digest"].as_str().unwrap())
        .collect();
    assert_eq!(digests, [v2.as_str(); 3], "{listed}");

    // --- v3 never becomes healthy under an agent: the first host rolls back to v2, the
    // rollout halts with the host's reason and serial tail, the others are never asked.
    let o = rollout(&v3, "1", true);
    assert!(!o.status.success(), "{}", show(&o, &up_log));
    let halted = last_line(&o);
    assert_eq!(halted.state, kiln::bus::RolloutState::Halted, "{halted:?}");
    let reason = halted.reason.clone().unwrap();
    assert!(
        reason.contains("hv-a") && reason.contains("app-broken") && reason.contains("wave 1 of 3"),
        "{reason}"
    );
    let f = agents[0].next("failed", boot);
    assert_eq!(f["rolled_back"], true, "{f}");
    assert!(page(ports[0]).contains("kiln-app release 2"));
    for h in &halted.hosts[1..] {
        assert_eq!(
            (h.state, h.attempts),
            (kiln::bus::HostState::Pending, 0),
            "{halted:?}"
        );
    }
    for (a, port) in agents[1..].iter().zip(&ports[1..]) {
        assert!(a.lines.recv_timeout(Duration::from_secs(2)).is_err());
        assert!(page(*port).contains("kiln-app release 2"));
    }
    let o = kiln(home.path())
        .args(["rollout", "status", &halted.id, "--nats", &url])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", show(&o, &up_log));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("halted") && text.contains("app-broken"),
        "{text}"
    );
    // Aborted, it stays where it is.
    let o = kiln(home.path())
        .args([
            "rollout",
            "abort",
            &halted.id,
            "--reason",
            "v3 is broken",
            "--nats",
            &url,
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", show(&o, &up_log));
    assert_eq!(
        rollout_status(home.path(), &url, &halted.id).state,
        kiln::bus::RolloutState::Aborted
    );

    // --- v1 again, its controller killed during the first wave's bake: a second controller
    // takes the rollout over when the lease ends and finishes it; each host deploys once.
    let o = rollout(&v1, "6", false);
    assert!(o.status.success(), "{}", show(&o, &up_log));
    let id = serde_json::from_slice::<Rollout>(&o.stdout).unwrap().id;
    let deadline = Instant::now() + boot;
    loop {
        let r = rollout_status(home.path(), &url, &id);
        if r.bake_since_ms.is_some() && r.wave == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the first wave never baked: {r:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    first.kill9();
    let _second = controller("ctl-2");
    let o = kiln(home.path())
        .args([
            "rollout", "status", &id, "--follow", "--json", "--nats", &url,
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", show(&o, &up_log));
    let done = last_line(&o);
    assert_eq!(done.state, kiln::bus::RolloutState::Completed, "{done:?}");
    assert_eq!(done.controller.as_deref(), Some("ctl-2"));
    let history: Vec<Rollout> = rt().block_on(async {
        let bus = Bus::connect_url(&url).await.unwrap();
        bus.stored_messages(&format!("kiln.rollout.{id}.>"))
            .await
            .unwrap()
            .iter()
            .map(|m| kiln::bus::decode(&m.payload).unwrap())
            .collect()
    });
    let claimed: Vec<Option<&str>> = history
        .iter()
        .filter(|r| r.event == "claimed")
        .map(|r| r.controller.as_deref())
        .collect();
    assert_eq!(claimed, [Some("ctl-1"), Some("ctl-2")], "{history:?}");
    let mut per_agent: Vec<String> = answers_of(&url, &id).into_iter().map(|c| c.agent).collect();
    per_agent.sort();
    assert_eq!(per_agent, AGENTS, "each host answered its order once");
    for (a, port) in agents.iter().zip(&ports) {
        let c = a.next("completed", boot);
        assert!(c["reference"].as_str().unwrap().ends_with(&v1), "{c}");
        assert!(
            a.lines.recv_timeout(Duration::from_secs(1)).is_err(),
            "deployed twice"
        );
        assert!(page(*port).contains("kiln-app release 1"));
    }

    // --- A revocation announced on the stream without one in the registry is a claim nobody
    // stored: the agents keep running v1.
    rt().block_on(async {
        let bus = Bus::connect_url(&url).await.unwrap();
        let forged = kiln::bus::ImageRevoked {
            v: 1,
            repository: repository.clone(),
            reference: format!("{repository}@{v1}"),
            digest: v1.clone(),
            reason: "forged".into(),
            by: "nobody@nowhere".into(),
            time: kiln::bus::EventTime::now(),
        };
        bus.publish_raw(forged.subject(), kiln::bus::encode(&forged))
            .await
            .unwrap();
    });
    for (a, port) in agents.iter().zip(&ports) {
        assert!(
            a.lines.recv_timeout(Duration::from_secs(3)).is_err(),
            "acted on a forged revocation"
        );
        assert!(page(*port).contains("kiln-app release 1"));
    }

    // --- v1 revoked while all three run it: each goes back to the image before it (v2) and
    // says why; pulls and promotions of v1 are refused from then on.
    let o = kiln(home.path())
        .args([
            "revoke",
            &format!("{repository}@{v1}"),
            "--reason",
            "v1 leaks memory",
        ])
        .args(["--nats", &url])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", show(&o, &up_log));
    for (a, port) in agents.iter().zip(&ports) {
        let c = a.next("completed", boot);
        assert!(c["reference"].as_str().unwrap().ends_with(&v2), "{c}");
        let cause = c["cause"].as_str().unwrap();
        assert!(
            cause.contains(&format!("revoked {v1}")) && cause.contains("v1 leaks memory"),
            "{c}"
        );
        assert!(page(*port).contains("kiln-app release 2"));
    }
    let o = kiln(home.path())
        .args(["pull", &format!("{repository}@{v1}"), "-o"])
        .arg(work.path().join("v1.qcow2"))
        .arg("--trust")
        .arg(&trust)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("was revoked: v1 leaks memory"), "{err}");
    assert!(!work.path().join("v1.qcow2").exists());
    let o = kiln(home.path())
        .args([
            "promote",
            &format!("{repository}@{v1}"),
            "--channel",
            "stable",
        ])
        .args(["--nats", &url, "--trust"])
        .arg(&trust)
        .arg("--trust-verifier")
        .arg(&verifier)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("revoked"),
        "{}",
        show(&o, &up_log)
    );
    let o = kiln(home.path())
        .args(["agents", "--group", "web", "--nats", &url])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "nobody runs a revoked image: {}",
        show(&o, &up_log)
    );
    assert!(!String::from_utf8_lossy(&o.stdout).contains("REVOKED"));
}

/// An application that stops answering 15 s after it started (`--set stop_after=15`): the
/// agent's health checks notice, it restarts the VM, and when the restarted VM stops answering
/// too it goes back to the image before and reports `failed`. An agent killed with SIGKILL while
/// a new VM boots stops that VM when it starts again, and its stable address is back at once;
/// killed, it is `gone` after three heartbeats and `healthy` again once restarted.
#[test]
fn a_vm_that_turns_unhealthy_is_restarted_then_rolled_back() {
    let home = shared_home();
    let work = tempfile::tempdir().unwrap();
    let reg = start_registry(None);
    let host = format!("127.0.0.1:{}", reg.port);
    let repository = format!("{host}/kiln/app");
    let server = kiln::bus::PrivateServer::start().unwrap();
    let url = server.url();
    let key = work.path().join("images.key");
    common::keygen(home.path(), &key);
    let up_log = work.path().join("up.log");
    let _up = {
        let mut c = kiln(home.path());
        c.args(["up", "--listen", "none", "--nats", &url])
            .args(["--publish-to", &host, "--key"])
            .arg(&key)
            .args(common::recipe_roots())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&up_log).unwrap());
        Running::new(c.spawn().unwrap())
    };
    submit(home.path(), &url, &["release=1"], &up_log);
    let state = work.path().join("hv-z");
    let _reaper = VmReaper(state.clone());
    let port = free_port();
    let agent_cmd = || {
        let mut c = kiln(home.path());
        c.args(["agent", "--nats", &url, "--name", "hv-z", "--json"])
            .args(["--watch", &format!("{repository}:latest")])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--group", "solo", "--heartbeat-interval", "1"])
            .args(["--health-interval", "1", "--health-retries", "3", "--trust"])
            .arg(work.path().join("images.key.pub"))
            .arg("--trust-verifier")
            .arg(home.path().join("verifier.key.pub"))
            .arg("--state-dir")
            .arg(&state);
        c
    };
    let log = work.path().join("hv-z.log");
    let mut agent = Agent::start(agent_cmd(), &log);
    let boot = Duration::from_secs(240);
    agent.next("ready", Duration::from_secs(30));
    let v1 = agent.next("completed", boot);
    let v1_ref = v1["reference"].as_str().unwrap().to_string();
    let v1_pid = v1["vm"]["pid"].as_u64().unwrap() as u32;
    let events = submit(home.path(), &url, &["release=2", "stop_after=15"], &up_log);
    let v2_ref = events.last().unwrap()["outputs"]["reference"]
        .as_str()
        .unwrap()
        .to_string();

    // Killed while v2's VM boots, the agent leaves that VM behind; restarted, it stops it,
    // its stable address serves v1 again at once, and it deploys v2 again.
    let deadline = Instant::now() + boot;
    let stray = loop {
        let booting: Vec<u32> = qemus_in(&state)
            .into_iter()
            .filter(|p| *p != v1_pid)
            .collect();
        if !booting.is_empty() {
            break booting;
        }
        assert!(Instant::now() < deadline, "v2's VM never started");
        std::thread::sleep(Duration::from_millis(50));
    };
    agent.proc.kill9();
    assert!(
        try_page(port).is_err(),
        "the stable address went with the agent"
    );
    let restarted_at = Instant::now();
    agent = Agent::start(agent_cmd(), &log);
    let back = loop {
        if try_page(port).is_ok_and(|t| t.contains("kiln-app release 1")) {
            break restarted_at.elapsed();
        }
        assert!(
            restarted_at.elapsed() < Duration::from_secs(10),
            "the stable address is not back"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    eprintln!("stable address back {back:?} after the agent was started again");
    assert!(back < Duration::from_secs(1), "{back:?}");
    let ready = agent.next("ready", Duration::from_secs(30));
    assert_eq!(ready["running"], v1_ref.as_str(), "{ready}");
    for pid in &stray {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists() || !qemus_in(&state).contains(pid),
            "the VM left behind (pid {pid}) still runs"
        );
    }
    let v2 = agent.next("completed", boot);
    assert_eq!(v2["reference"], v2_ref.as_str(), "{v2}");
    assert!(page(port).contains("kiln-app release 2"));
    let first_pid = v2["vm"]["pid"].as_u64().unwrap();

    // 15 s later the application stops; three failed checks later the VM is restarted.
    let restarted = agent.next("completed", boot);
    assert_eq!(restarted["reference"], v2_ref.as_str(), "{restarted}");
    let cause = restarted["cause"].as_str().unwrap();
    assert!(
        cause.starts_with("restarted: ")
            && cause.contains("does not answer")
            && cause.contains("3 checks in a row"),
        "{restarted}"
    );
    assert_ne!(restarted["vm"]["pid"].as_u64().unwrap(), first_pid);
    assert!(page(port).contains("kiln-app release 2"));

    // It stops again: back to v1, reported as a failure of v2.
    let failed = agent.next("failed", boot);
    assert_eq!(failed["reference"], v2_ref.as_str(), "{failed}");
    assert_eq!(failed["rolled_back"], true, "{failed}");
    assert_eq!(failed["running"], v1_ref.as_str(), "{failed}");
    let why = failed["error"]["message"].as_str().unwrap();
    assert!(
        why.contains("became unhealthy after it was deployed")
            && why.contains("restarted once already")
            && why.contains(&format!("went back to {v1_ref}")),
        "{why}"
    );
    assert!(page(port).contains("kiln-app release 1"));
    let history: Vec<String> = rt().block_on(async {
        let bus = Bus::connect_url(&url).await.unwrap();
        bus.stored_messages("kiln.agent.hv-z.heartbeat")
            .await
            .unwrap()
            .iter()
            .map(|m| kiln::bus::decode::<kiln::bus::AgentHeartbeat>(&m.payload).unwrap())
            .map(|h| h.health.name().to_string())
            .collect()
    });
    assert!(history.iter().any(|h| h == "unhealthy"), "{history:?}");

    // Killed, the agent is gone after three heartbeats; restarted, it re-adopts its VM and
    // does not deploy v2 again from its announcement.
    let agents = |expect_ok: bool| -> serde_json::Value {
        let o = kiln(home.path())
            .args(["agents", "--json", "--nats", &url])
            .output()
            .unwrap();
        assert_eq!(o.status.success(), expect_ok, "{}", show(&o, &up_log));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    agent.proc.kill9();
    std::thread::sleep(Duration::from_millis(4500));
    assert_eq!(agents(false)["agents"][0]["state"], "gone");
    agent = Agent::start(agent_cmd(), &log);
    let ready = agent.next("ready", Duration::from_secs(30));
    assert_eq!(ready["running"], v1_ref.as_str(), "{ready}");
    std::thread::sleep(Duration::from_millis(1500));
    let listed = agents(true);
    assert_eq!(listed["agents"][0]["state"], "healthy", "{listed}");
    assert!(agent.lines.recv_timeout(Duration::from_secs(3)).is_err());
}
