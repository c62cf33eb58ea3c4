//! Delta delivery against Debian's `docker-registry`: two builds of `recipes/app.yaml` that
//! differ in one rendered file, published with their chunk indexes (chunks are fetched as
//! ranges of the disk layer); pulls of v2 seeded with v1
//! through a counting proxy (written here: the bytes it passes are the oracle, not kiln's own
//! report) fetch a small part of v2 and give v2 byte for byte; a registry that serves one bad
//! chunk fails the pull naming it after one retry, with nothing written in place; a pull cut off
//! midway resumes without fetching its finished chunks again; an index that does not describe
//! the signed image is refused. (The agent's delta deploys are checked in tests/agent.rs.)

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Output;

mod common;
use common::registry::{CountingProxy, Proxied, start_registry};
use common::{kiln, root, sha256, shared_home};

/// `kiln build recipes/app.yaml --set release=R` without a boot; the image's path.
fn build(home: &Path, release: &str, dir: &Path) -> PathBuf {
    let o = kiln(home)
        .current_dir(root())
        .args(["build", "recipes/app.yaml", "--no-verify", "--no-bus"])
        .args(["--set", &format!("release={release}"), "-o"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    dir.join("app-1.0.0.qcow2")
}

fn json(o: &Output) -> serde_json::Value {
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

fn pull(home: &Path, reference: &str, out: &Path, trust: &Path, seeds: &[&Path]) -> Output {
    let mut c = kiln(home);
    c.args(["pull", reference, "--json", "-o"])
        .arg(out)
        .arg("--trust")
        .arg(trust);
    for s in seeds {
        c.arg("--seed").arg(s);
    }
    c.output().unwrap()
}

/// The manifest `reference` of `repo`, read with plain HTTP from the registry.
fn manifest(port: u16, repo: &str, reference: &str) -> serde_json::Value {
    let bytes = reqwest::blocking::Client::new()
        .get(format!(
            "http://127.0.0.1:{port}/v2/{repo}/manifests/{reference}"
        ))
        .header("Accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .unwrap()
        .bytes()
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

/// The chunk index of an image manifest, read with plain HTTP from the registry.
fn chunk_index(port: u16, repo: &str, manifest_digest: &str) -> serde_json::Value {
    let http = reqwest::blocking::Client::new();
    let tag = format!(
        "sha256-{}.chunks",
        manifest_digest.trim_start_matches("sha256:")
    );
    let m = manifest(port, repo, &tag);
    assert_eq!(
        m["artifactType"], "application/vnd.kiln.chunks.v1+json",
        "{m}"
    );
    assert_eq!(m["subject"]["digest"], manifest_digest, "{m}");
    let config = m["config"]["digest"].as_str().unwrap();
    let index = http
        .get(format!("http://127.0.0.1:{port}/v2/{repo}/blobs/{config}"))
        .send()
        .unwrap()
        .bytes()
        .unwrap();
    serde_json::from_slice(&index).unwrap()
}

fn digests(index: &serde_json::Value) -> HashSet<String> {
    index["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["digest"].as_str().unwrap().to_string())
        .collect()
}

/// The chunks (by digest) that a proxy log shows fetched as ranges of the layer `layer`,
/// answered or not, by the chunks' offsets in `index`.
fn chunk_gets(
    log: &[Proxied],
    layer: &str,
    index: &serde_json::Value,
    answered: bool,
) -> Vec<String> {
    let at: std::collections::HashMap<u64, String> = index["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["offset"].as_u64().unwrap(),
                c["digest"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    log.iter()
        .filter(|p| p.method == "GET" && p.answered == answered && p.path.ends_with(layer))
        .filter_map(|p| at.get(&p.range_start?).cloned())
        .collect()
}

#[test]
fn a_seeded_pull_fetches_what_changed_checks_every_chunk_and_resumes() {
    let home = shared_home();
    let work = tempfile::tempdir().unwrap();
    let v1 = build(home.path(), "1", &work.path().join("v1"));
    let v2 = build(home.path(), "2", &work.path().join("v2"));
    let size = std::fs::metadata(&v2).unwrap().len();

    let reg = start_registry(None);
    let repo = "kiln/delta";
    let key = work.path().join("k.key");
    common::keygen(home.path(), &key);
    let trust = work.path().join("k.key.pub");
    let publish = |image: &Path, tag: &str| -> serde_json::Value {
        json(
            &kiln(home.path())
                .arg("publish")
                .arg(image)
                .args([
                    "--to",
                    &format!("127.0.0.1:{}/{repo}:{tag}", reg.port),
                    "--tag",
                    "latest",
                    "--json",
                    "--key",
                ])
                .arg(&key)
                .output()
                .unwrap(),
        )
    };
    let p1 = publish(&v1, "v1");
    let p2 = publish(&v2, "v2");
    // The second publish finds most of its chunks in the image `latest` pointed at.
    let c2 = &p2["chunks"];
    assert!(c2["chunks"].as_u64().unwrap() > 10, "{p2}");
    assert!(
        c2["new_bytes"].as_u64().unwrap() * 10 < c2["known_bytes"].as_u64().unwrap(),
        "{p2}"
    );
    assert_eq!(p1["chunks"]["known_bytes"], 0, "{p1}");
    let layer = p2["layer_digest"].as_str().unwrap().to_string();
    let i1 = chunk_index(reg.port, repo, p1["manifest_digest"].as_str().unwrap());
    let i2 = chunk_index(reg.port, repo, p2["manifest_digest"].as_str().unwrap());
    assert_eq!(
        i2["digest"], p2["layer_digest"],
        "the index names the signed disk"
    );
    let (d1, d2) = (digests(&i1), digests(&i2));
    let new: HashSet<String> = d2.difference(&d1).cloned().collect();
    assert!(!new.is_empty());

    let proxy = CountingProxy::start(reg.port);
    let via = format!("127.0.0.1:{}/{repo}:v2", proxy.port);

    // Whole: the proxy passes at least the disk.
    let whole = work.path().join("whole.img");
    json(&pull(home.path(), &via, &whole, &trust, &[]));
    let full_bytes = proxy.take_bytes();
    assert!(full_bytes >= size, "{full_bytes} < {size}");
    proxy.take_log();

    // Seeded with v1: a small part of v2 comes over the wire, the result is v2.
    let out = work.path().join("v2.img");
    let report = json(&pull(home.path(), &via, &out, &trust, &[&v1]));
    let seeded_bytes = proxy.take_bytes();
    assert_eq!(
        sha256(&out),
        sha256(&v2),
        "the rebuilt disk is v2 byte for byte"
    );
    assert!(
        seeded_bytes * 10 < size,
        "a seeded pull passed {seeded_bytes} bytes for a {size}-byte disk"
    );
    let delta = &report["delta"];
    assert!(
        delta["reused_bytes"].as_u64().unwrap() * 2 > size,
        "{report}"
    );
    assert!(
        delta["fetched_bytes"].as_u64().unwrap() <= seeded_bytes,
        "{report}"
    );
    let fetched: HashSet<String> = chunk_gets(&proxy.take_log(), &layer, &i2, true)
        .into_iter()
        .collect();
    assert_eq!(fetched, new, "exactly the chunks v1 lacks are fetched");
    println!(
        "v2 {size} bytes: whole pull {full_bytes} bytes through the proxy, seeded {seeded_bytes}"
    );

    // The byte offset of each chunk of v2, for the proxy.
    let offset_of = |digest: &str| -> u64 {
        i2["chunks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["digest"] == digest)
            .unwrap()["offset"]
            .as_u64()
            .unwrap()
    };

    // One chunk served wrong every time: fetched twice, then the pull fails naming it, and
    // nothing is written in place.
    let bad = new.iter().next().unwrap().clone();
    proxy
        .corrupt
        .lock()
        .unwrap()
        .insert(format!("{layer}@{}", offset_of(&bad)));
    let broken = work.path().join("broken.img");
    let o = pull(home.path(), &via, &broken, &trust, &[&v1]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&bad) && err.contains("fetched twice"), "{err}");
    assert!(!broken.exists(), "a failed pull left {}", broken.display());
    let gets = chunk_gets(&proxy.take_log(), &layer, &i2, true);
    assert_eq!(gets.iter().filter(|d| **d == bad).count(), 2, "{gets:?}");
    proxy.corrupt.lock().unwrap().clear();
    std::fs::remove_file(kiln::store::partial_path(&broken)).ok();

    // Cut off midway (half the new chunks refused), then resumed: what arrived the first time
    // is not fetched again.
    let half: HashSet<String> = new
        .iter()
        .take(new.len().div_ceil(2))
        .map(|d| format!("{layer}@{}", offset_of(d)))
        .collect();
    assert!(half.len() < new.len(), "{new:?}");
    *proxy.refuse.lock().unwrap() = half;
    let resumed = work.path().join("resumed.img");
    let o = pull(home.path(), &via, &resumed, &trust, &[&v1]);
    assert!(
        !o.status.success(),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(!resumed.exists());
    assert!(
        kiln::store::partial_path(&resumed).exists(),
        "the partial pull is kept"
    );
    let first = chunk_gets(&proxy.take_log(), &layer, &i2, true);
    assert!(!first.is_empty(), "no chunk arrived before the cut");
    proxy.refuse.lock().unwrap().clear();
    let report = json(&pull(home.path(), &via, &resumed, &trust, &[&v1]));
    assert_eq!(sha256(&resumed), sha256(&v2));
    let second = chunk_gets(&proxy.take_log(), &layer, &i2, true);
    for d in &first {
        assert!(
            !second.contains(d),
            "{d} fetched again after the resume: {report}"
        );
    }
    assert!(
        report["delta"]["resumed_chunks"].as_u64().unwrap() > 0,
        "{report}"
    );

    // An index that describes another disk than the signed manifest's: refused.
    let mut forged = i2.clone();
    forged["digest"] = p1["layer_digest"].clone();
    let forged_bytes = serde_json::to_vec(&forged).unwrap();
    let http = reqwest::blocking::Client::new();
    let blob = format!("sha256:{}", common::sha256_bytes(&forged_bytes));
    let r = http
        .post(format!(
            "http://127.0.0.1:{}/v2/{repo}/blobs/uploads/",
            reg.port
        ))
        .send()
        .unwrap();
    assert_eq!(r.status(), 202, "{r:?}");
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let location = match location.starts_with('/') {
        true => format!("http://127.0.0.1:{}{location}", reg.port),
        false => location,
    };
    let sep = if location.contains('?') { '&' } else { '?' };
    let r = http
        .put(format!("{location}{sep}digest={blob}"))
        .header("Content-Type", "application/octet-stream")
        .body(forged_bytes.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), 201, "{r:?}");
    let tag = format!(
        "sha256-{}.chunks",
        p2["manifest_digest"]
            .as_str()
            .unwrap()
            .trim_start_matches("sha256:")
    );
    let mut m = manifest(reg.port, repo, &tag);
    m["config"]["digest"] = blob.clone().into();
    m["config"]["size"] = forged_bytes.len().into();
    let r = http
        .put(format!(
            "http://127.0.0.1:{}/v2/{repo}/manifests/{tag}",
            reg.port
        ))
        .header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
        .body(serde_json::to_vec(&m).unwrap())
        .send()
        .unwrap();
    assert!(r.status().is_success(), "{r:?}");
    let refused = work.path().join("refused.img");
    let o = pull(home.path(), &via, &refused, &trust, &[&v1]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("signed manifest") && err.contains("refused"),
        "{err}"
    );
    assert!(!refused.exists());
    // Without seeds the same image still pulls whole.
    json(&pull(home.path(), &via, &refused, &trust, &[]));
    assert_eq!(sha256(&refused), sha256(&v2));
}
