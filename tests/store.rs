//! The image store against a real registry: Debian's `docker-registry` (distribution 2.8),
//! started per test on a free loopback port with its storage in a temp dir. `curl` and
//! `sha256sum` are the second opinion on what the registry holds.

use kiln::digest::Digest256;
use kiln::store::registry::Credentials;
use kiln::store::{
    self, PublishMeta, SignatureCheck, StoreError, StoreOptions, load_signing_key,
    load_verifying_key,
};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

mod common;
use common::registry::{RegistryServer, start_registry};
use common::{Running, curl, free_port, sha256_digest};

/// A deterministic pseudo-random image file.
fn make_image(path: &Path, size: u64, seed: u64) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut x = seed | 1;
    let mut block = vec![0u8; MIB as usize];
    let mut left = size;
    while left > 0 {
        for chunk in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        let n = left.min(MIB) as usize;
        f.write_all(&block[..n]).unwrap();
        left -= n as u64;
    }
    f.flush().unwrap();
}

const ACCEPT_OCI: &str = "Accept: application/vnd.oci.image.manifest.v1+json";

fn meta(commit: &str) -> PublishMeta {
    PublishMeta {
        recipe: "test-recipe".into(),
        recipe_digest: Some(Digest256::of(b"recipe").to_string()),
        git_commit: Some(commit.into()),
        boot_report: Some(r#"{"booted":true,"seconds":4.1}"#.into()),
        source_date_epoch: 1_700_000_000,
        extra_tags: vec![],
        title: Some("disk.raw".into()),
        format: None,
        annotations: Default::default(),
    }
}

fn keypair(dir: &Path, name: &str) -> (store::SigningKey, store::VerifyingKey) {
    let p = dir.join(name);
    store::keygen(&p, store::KeyType::EcdsaP256).unwrap();
    (
        load_signing_key(&p).unwrap(),
        load_verifying_key(&store::sign::public_key_path(&p)).unwrap(),
    )
}

fn opts() -> StoreOptions {
    StoreOptions::default()
}

#[test]
fn publish_list_fetch_with_curl_and_pull_verified() {
    let reg = start_registry(None);
    let work = tempfile::tempdir().unwrap();
    let image = work.path().join("disk.raw");
    make_image(&image, 30 * MIB + 12345, 1);
    let (sk, vk) = keypair(work.path(), "kiln.key");
    let host = format!("127.0.0.1:{}", reg.port);
    let mut m = meta("abc123");
    m.extra_tags = vec!["stable".into()];
    let rep = store::publish(
        &image,
        &format!("{host}/kiln/test-image:v1"),
        &m,
        Some(&sk),
        &opts(),
    )
    .unwrap();
    assert_eq!(rep.bytes, 30 * MIB + 12345);
    assert_eq!(rep.uploaded, rep.bytes);
    assert_eq!(rep.layer_digest.as_str(), sha256_digest(&image));
    assert_eq!(rep.tags, vec!["v1", "stable"]);
    assert!(rep.signature_digest.is_some());
    assert_eq!(
        rep.reference,
        format!("{host}/kiln/test-image:v1@{}", rep.manifest_digest)
    );

    // Publishing again uploads nothing and yields the same manifest (deterministic bytes).
    let again = store::publish(
        &image,
        &format!("{host}/kiln/test-image:v1"),
        &m,
        Some(&sk),
        &opts(),
    )
    .unwrap();
    assert_eq!(again.uploaded, 0);
    assert_eq!(again.manifest_digest, rep.manifest_digest);

    // The registry's own API lists the tags, including the signature tag.
    let base = format!("http://{host}/v2/kiln/test-image");
    let tags: serde_json::Value =
        serde_json::from_slice(&curl(&[&format!("{base}/tags/list")])).unwrap();
    let mut tags: Vec<String> = tags["tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    tags.sort();
    let sig_tag = format!("sha256-{}.sig", rep.manifest_digest.hex());
    let chunks_tag = format!("sha256-{}.chunks", rep.manifest_digest.hex());
    assert_eq!(
        tags,
        vec![chunks_tag, sig_tag.clone(), "stable".into(), "v1".into()]
    );

    // curl fetches the manifest and the blob; their sha256 match.
    let mpath = work.path().join("manifest.json");
    curl(&[
        "-H",
        ACCEPT_OCI,
        "-o",
        mpath.to_str().unwrap(),
        &format!("{base}/manifests/v1"),
    ]);
    assert_eq!(sha256_digest(&mpath), rep.manifest_digest.as_str());
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
    assert_eq!(manifest["artifactType"], "application/vnd.kiln.disk.v1");
    assert_eq!(
        manifest["layers"][0]["mediaType"],
        "application/vnd.kiln.disk.raw"
    );
    assert_eq!(
        manifest["annotations"]["org.opencontainers.image.created"],
        "2023-11-14T22:13:20Z"
    );
    assert_eq!(manifest["annotations"]["dev.kiln.git.commit"], "abc123");
    let bpath = work.path().join("blob");
    curl(&[
        "-o",
        bpath.to_str().unwrap(),
        &format!("{base}/blobs/{}", rep.layer_digest),
    ]);
    assert_eq!(sha256_digest(&bpath), rep.layer_digest.as_str());
    // The signature is cosign's: a simple signing layer; the manifest names the image as its
    // subject (for registries with the referrers API).
    let sig: serde_json::Value = serde_json::from_slice(&curl(&[
        "-H",
        ACCEPT_OCI,
        &format!("{base}/manifests/{sig_tag}"),
    ]))
    .unwrap();
    assert_eq!(
        sig["artifactType"],
        "application/vnd.dev.cosign.artifact.sig.v1+json"
    );
    assert_eq!(
        sig["layers"][0]["mediaType"],
        "application/vnd.dev.cosign.simplesigning.v1+json"
    );
    assert_eq!(sig["subject"]["digest"], rep.manifest_digest.as_str());
    // distribution 2.8 has no referrers API.
    let code = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!("{base}/referrers/{}", rep.manifest_digest))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&code.stdout), "404");

    // Pull with the trusted key: same bytes, verified.
    let out = work.path().join("pulled.raw");
    let pr = store::pull(
        &format!("{host}/kiln/test-image:stable"),
        &out,
        Some(&vk),
        &opts(),
    )
    .unwrap();
    assert_eq!(
        pr.signature,
        SignatureCheck::Verified {
            key: store::sign::key_id(&vk),
            key_type: store::KeyType::EcdsaP256,
        }
    );
    assert_eq!(pr.manifest_digest, rep.manifest_digest);
    assert_eq!(pr.transferred, pr.bytes);
    assert_eq!(sha256_digest(&out), rep.layer_digest.as_str());
    assert!(!store::partial_path(&out).exists());
    assert_eq!(pr.format, "raw");
    // By digest, without a key: digests checked, signature reported unchecked.
    let out2 = work.path().join("pulled2.raw");
    let pr2 = store::pull(
        &format!("{host}/kiln/test-image@{}", rep.manifest_digest),
        &out2,
        None,
        &opts(),
    )
    .unwrap();
    assert!(matches!(pr2.signature, SignatureCheck::Unchecked { .. }));
    assert_eq!(sha256_digest(&out2), rep.layer_digest.as_str());
    // A digest that is not the tag's: not found.
    let wrong = Digest256::of(b"nothing");
    assert!(matches!(
        store::pull(
            &format!("{host}/kiln/test-image@{wrong}"),
            &out2,
            None,
            &opts()
        ),
        Err(StoreError::NotFound { .. })
    ));

    // Listing: repository and catalog.
    let list = store::images(&format!("{host}/kiln/test-image"), &opts()).unwrap();
    assert_eq!(list.len(), 2, "{list:?}");
    for (info, tag) in list.iter().zip(["stable", "v1"]) {
        assert_eq!(info.tag, tag);
        assert_eq!(info.manifest_digest, rep.manifest_digest);
        assert_eq!(info.size, 30 * MIB + 12345);
        assert_eq!(info.created.as_deref(), Some("2023-11-14T22:13:20Z"));
        assert!(info.signed);
    }
    let all = store::images(&host, &opts()).unwrap();
    assert_eq!(all, list);
}

#[test]
fn refuses_untrusted_unsigned_changed_and_forged() {
    let reg = start_registry(None);
    let work = tempfile::tempdir().unwrap();
    let image = work.path().join("disk.raw");
    make_image(&image, 3 * MIB, 2);
    let (sk, vk) = keypair(work.path(), "trusted.key");
    let (other_sk, _) = keypair(work.path(), "other.key");
    let host = format!("127.0.0.1:{}", reg.port);
    let repo = format!("{host}/kiln/img");
    let base = format!("http://{host}/v2/kiln/img");
    let out = work.path().join("out.raw");

    // Signed by an untrusted key.
    store::publish(
        &image,
        &format!("{repo}:other"),
        &meta("other"),
        Some(&other_sk),
        &opts(),
    )
    .unwrap();
    let e = store::pull(&format!("{repo}:other"), &out, Some(&vk), &opts()).unwrap_err();
    assert!(matches!(e, StoreError::BadSignature { .. }), "{e}");
    assert!(!out.exists());

    // Unsigned: refused with a key, accepted (with a warning) without.
    store::publish(
        &image,
        &format!("{repo}:unsigned"),
        &meta("unsigned"),
        None,
        &opts(),
    )
    .unwrap();
    let e = store::pull(&format!("{repo}:unsigned"), &out, Some(&vk), &opts()).unwrap_err();
    assert!(matches!(e, StoreError::Unsigned { .. }), "{e}");
    let pr = store::pull(&format!("{repo}:unsigned"), &out, None, &opts()).unwrap();
    assert_eq!(pr.signature, SignatureCheck::Missing);
    std::fs::remove_file(&out).unwrap();

    // Signed properly, then the tag moved to a different manifest without re-signing.
    let good = store::publish(
        &image,
        &format!("{repo}:v1"),
        &meta("c1"),
        Some(&sk),
        &opts(),
    )
    .unwrap();
    let good_manifest = curl(&["-H", ACCEPT_OCI, &format!("{base}/manifests/v1")]);
    let moved = store::publish(&image, &format!("{repo}:v1"), &meta("c2"), None, &opts()).unwrap();
    assert_ne!(moved.manifest_digest, good.manifest_digest);
    let e = store::pull(&format!("{repo}:v1"), &out, Some(&vk), &opts()).unwrap_err();
    assert!(matches!(e, StoreError::Unsigned { .. }), "{e}");

    // The old signature copied over to the new manifest's signature tag: signs another manifest.
    let sig_path = work.path().join("sig.json");
    let sig = curl(&[
        "-H",
        ACCEPT_OCI,
        &format!(
            "{base}/manifests/{}",
            store::signature_tag(&good.manifest_digest)
        ),
    ]);
    std::fs::write(&sig_path, &sig).unwrap();
    let put = |tag: &str, file: &Path| {
        curl(&[
            "-X",
            "PUT",
            "-H",
            "Content-Type: application/vnd.oci.image.manifest.v1+json",
            "--data-binary",
            &format!("@{}", file.display()),
            &format!("{base}/manifests/{tag}"),
        ]);
    };
    put(&store::signature_tag(&moved.manifest_digest), &sig_path);
    let e = store::pull(&format!("{repo}:v1"), &out, Some(&vk), &opts()).unwrap_err();
    assert!(matches!(e, StoreError::ManifestChanged { .. }), "{e}");

    // Tag back on the signed manifest, but the signature bytes altered: does not verify.
    let good_path = work.path().join("good.json");
    std::fs::write(&good_path, &good_manifest).unwrap();
    put("v1", &good_path);
    let pr = store::pull(&format!("{repo}:v1"), &out, Some(&vk), &opts()).unwrap();
    assert!(matches!(pr.signature, SignatureCheck::Verified { .. }));
    std::fs::remove_file(&out).unwrap();
    let mut sig_json: serde_json::Value = serde_json::from_slice(&sig).unwrap();
    let ann = store::ANN_COSIGN_SIGNATURE;
    let s = sig_json["layers"][0]["annotations"][ann]
        .as_str()
        .unwrap()
        .to_string();
    // One base64 digit in the middle of the signature changed.
    sig_json["layers"][0]["annotations"][ann] = common::change_base64_digit(&s).into();
    std::fs::write(&sig_path, serde_json::to_vec(&sig_json).unwrap()).unwrap();
    put(&store::signature_tag(&good.manifest_digest), &sig_path);
    let e = store::pull(&format!("{repo}:v1"), &out, Some(&vk), &opts()).unwrap_err();
    assert!(matches!(e, StoreError::BadSignature { .. }), "{e}");
    assert!(!out.exists());
}

#[test]
fn refuses_a_blob_changed_in_the_registry_storage() {
    let reg = start_registry(None);
    let work = tempfile::tempdir().unwrap();
    let image = work.path().join("disk.raw");
    make_image(&image, 5 * MIB, 3);
    let (sk, vk) = keypair(work.path(), "k");
    let r = format!("127.0.0.1:{}/kiln/img:v1", reg.port);
    let rep = store::publish(&image, &r, &meta("c"), Some(&sk), &opts()).unwrap();
    let hex = rep.layer_digest.hex();
    let data = reg
        .root
        .path()
        .join("data/docker/registry/v2/blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .join("data");
    let mut bytes = std::fs::read(&data).unwrap();
    bytes[4 * MIB as usize] ^= 0x40;
    std::fs::write(&data, bytes).unwrap();
    let out = work.path().join("out.raw");
    let e = store::pull(&r, &out, Some(&vk), &opts()).unwrap_err();
    assert!(
        matches!(&e, StoreError::DigestMismatch { expected, .. } if expected == &rep.layer_digest),
        "{e}"
    );
    assert!(!out.exists());
    assert!(!store::partial_path(&out).exists());
}

/// A loopback TCP proxy that records what clients send and can cut the connection once a given
/// number of response bytes went through.
struct Proxy {
    port: u16,
    sent: Arc<Mutex<Vec<u8>>>,
    received: Arc<AtomicU64>,
    cut_after: Arc<AtomicU64>,
    /// Rename the client's `Range` header (same length) so the registry ignores it.
    hide_range: Arc<AtomicBool>,
}

fn start_proxy(upstream: u16) -> Proxy {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let sent = Arc::new(Mutex::new(Vec::new()));
    let received = Arc::new(AtomicU64::new(0));
    let cut_after = Arc::new(AtomicU64::new(u64::MAX));
    let hide_range = Arc::new(AtomicBool::new(false));
    let (s, r, c, h) = (
        sent.clone(),
        received.clone(),
        cut_after.clone(),
        hide_range.clone(),
    );
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(client) = conn else { return };
            let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                return;
            };
            let (mut c_in, mut s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            let log = s.clone();
            let hide = h.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = c_in.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    log.lock().unwrap().extend_from_slice(&buf[..n]);
                    if hide.load(Ordering::SeqCst) {
                        let lower = buf[..n].to_ascii_lowercase();
                        if let Some(i) = lower.windows(13).position(|w| w == b"range: bytes=") {
                            buf[i..i + 6].copy_from_slice(b"x-rng:");
                        }
                    }
                    if s_out.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = s_out.shutdown(Shutdown::Write);
            });
            let (r, c) = (r.clone(), c.clone());
            std::thread::spawn(move || {
                let (mut s_in, mut c_out) = (server, client);
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = s_in.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let before = r.fetch_add(n as u64, Ordering::SeqCst);
                    let limit = c.load(Ordering::SeqCst);
                    let n = if before + n as u64 > limit {
                        (limit.saturating_sub(before)) as usize
                    } else {
                        n
                    };
                    if c_out.write_all(&buf[..n]).is_err() || before + (n as u64) >= limit {
                        let _ = c_out.shutdown(Shutdown::Both);
                        let _ = s_in.shutdown(Shutdown::Both);
                        break;
                    }
                }
                let _ = c_out.shutdown(Shutdown::Write);
            });
        }
    });
    Proxy {
        port,
        sent,
        received,
        cut_after,
        hide_range,
    }
}

#[test]
fn interrupted_pull_resumes_with_a_range_request() {
    let reg = start_registry(None);
    let proxy = start_proxy(reg.port);
    let work = tempfile::tempdir().unwrap();
    let image = work.path().join("disk.raw");
    make_image(&image, 30 * MIB, 4);
    let (sk, vk) = keypair(work.path(), "k");
    store::publish(
        &image,
        &format!("127.0.0.1:{}/kiln/img:v1", reg.port),
        &meta("c"),
        Some(&sk),
        &opts(),
    )
    .unwrap();
    let via_proxy = format!("127.0.0.1:{}/kiln/img:v1", proxy.port);
    let out = work.path().join("out.raw");
    let partial = store::partial_path(&out);

    proxy.cut_after.store(12 * MIB, Ordering::SeqCst);
    let e = store::pull(&via_proxy, &out, Some(&vk), &opts()).unwrap_err();
    assert!(matches!(e, StoreError::Http { .. }), "{e}");
    assert!(
        !out.exists(),
        "nothing may appear at OUT before it is complete"
    );
    let kept = std::fs::metadata(&partial).unwrap().len();
    assert!(kept > 8 * MIB && kept < 12 * MIB, "kept {kept}");

    proxy.cut_after.store(u64::MAX, Ordering::SeqCst);
    proxy.received.store(0, Ordering::SeqCst);
    proxy.sent.lock().unwrap().clear();
    let pr = store::pull(&via_proxy, &out, Some(&vk), &opts()).unwrap();
    assert_eq!(pr.resumed_from, kept);
    assert_eq!(pr.transferred, 30 * MIB - kept);
    let requests = String::from_utf8_lossy(&proxy.sent.lock().unwrap()).to_ascii_lowercase();
    assert!(
        requests.contains(&format!("range: bytes={kept}-")),
        "no Range request in:\n{requests}"
    );
    let over_the_wire = proxy.received.load(Ordering::SeqCst);
    assert!(
        over_the_wire < 30 * MIB - kept + MIB,
        "{over_the_wire} bytes came over for {} missing",
        30 * MIB - kept
    );
    assert_eq!(sha256_digest(&out), sha256_digest(&image));
    assert!(!partial.exists());

    // A server that ignores Range (200 with the whole blob): the pull starts over and verifies.
    let out2 = work.path().join("out2.raw");
    proxy.cut_after.store(12 * MIB, Ordering::SeqCst);
    proxy.received.store(0, Ordering::SeqCst);
    store::pull(&via_proxy, &out2, Some(&vk), &opts()).unwrap_err();
    assert!(store::partial_path(&out2).exists());
    proxy.cut_after.store(u64::MAX, Ordering::SeqCst);
    proxy.hide_range.store(true, Ordering::SeqCst);
    let pr = store::pull(&via_proxy, &out2, Some(&vk), &opts()).unwrap();
    assert_eq!(pr.resumed_from, 0);
    assert_eq!(pr.transferred, 30 * MIB);
    assert_eq!(sha256_digest(&out2), sha256_digest(&image));
}

#[test]
fn oci_layout_directory_round_trip() {
    let work = tempfile::tempdir().unwrap();
    let image = work.path().join("disk.qcow2");
    // A qcow2 made by qemu-img, so the format is detected from its magic.
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&image)
        .arg("64M")
        .status()
        .unwrap();
    assert!(st.success());
    let (sk, vk) = keypair(work.path(), "k");
    let dir = work.path().join("layout");
    let rep = store::publish(
        &image,
        &format!("oci:{}:v1", dir.display()),
        &meta("c"),
        Some(&sk),
        &opts(),
    )
    .unwrap();
    let oci_layout: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("oci-layout")).unwrap()).unwrap();
    assert_eq!(oci_layout["imageLayoutVersion"], "1.0.0");
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    // The image, its chunk index and its signature.
    let entries = index["manifests"].as_array().unwrap();
    assert_eq!(entries.len(), 3, "{index}");
    let tagged = entries
        .iter()
        .find(|e| e["annotations"]["org.opencontainers.image.ref.name"] == "v1")
        .unwrap();
    assert_eq!(tagged["digest"], rep.manifest_digest.as_str());
    assert!(
        entries
            .iter()
            .any(|e| e["annotations"]["org.opencontainers.image.ref.name"]
                == format!("sha256-{}.chunks", rep.manifest_digest.hex()))
    );
    // Every blob is stored under its sha256.
    for e in std::fs::read_dir(dir.join("blobs/sha256")).unwrap() {
        let p = e.unwrap().path();
        assert_eq!(
            sha256_digest(&p),
            format!("sha256:{}", p.file_name().unwrap().to_str().unwrap())
        );
    }
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.join("blobs/sha256").join(rep.manifest_digest.hex())).unwrap(),
    )
    .unwrap();
    assert_eq!(
        manifest["layers"][0]["mediaType"],
        "application/vnd.kiln.disk.qcow2"
    );

    let out = work.path().join("out.qcow2");
    let pr = store::pull(
        &format!("oci:{}:v1", dir.display()),
        &out,
        Some(&vk),
        &opts(),
    )
    .unwrap();
    assert!(matches!(pr.signature, SignatureCheck::Verified { .. }));
    assert_eq!(pr.format, "qcow2");
    assert_eq!(sha256_digest(&out), sha256_digest(&image));

    // The signature names the repository it was made for: a copy elsewhere is refused, unless
    // the puller accepts signatures made for the original.
    let copy = work.path().join("copy");
    let st = Command::new("cp")
        .arg("-a")
        .arg(&dir)
        .arg(&copy)
        .status()
        .unwrap();
    assert!(st.success());
    let copied = format!("oci:{}:v1", copy.display());
    let e = store::pull(&copied, &work.path().join("c.qcow2"), Some(&vk), &opts()).unwrap_err();
    assert!(matches!(e, StoreError::OtherRepository { .. }), "{e}");
    assert!(e.to_string().contains("--signed-for"), "{e}");
    assert!(!work.path().join("c.qcow2").exists());
    let accepting = StoreOptions {
        signed_for: vec![dir.display().to_string()],
        ..opts()
    };
    let pr = store::pull(&copied, &work.path().join("c.qcow2"), Some(&vk), &accepting).unwrap();
    assert!(matches!(pr.signature, SignatureCheck::Verified { .. }));

    let list = store::images(&format!("oci:{}", dir.display()), &opts()).unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].tag, "v1");
    assert!(list[0].signed);
    let st = Command::new("qemu-img")
        .args(["compare", "-q"])
        .arg(&image)
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn basic_auth_with_htpasswd() {
    let work = tempfile::tempdir().unwrap();
    let htpasswd = work.path().join("htpasswd");
    let st = Command::new("htpasswd")
        .args(["-Bbc"])
        .arg(&htpasswd)
        .args(["kiln", "s3cret"])
        .stderr(Stdio::null())
        .status()
        .expect("htpasswd (Debian package apache2-utils) must be installed");
    assert!(st.success());
    let reg = start_registry(Some(&htpasswd));
    let image = work.path().join("disk.raw");
    make_image(&image, 2 * MIB, 5);
    let r = format!("127.0.0.1:{}/kiln/img:v1", reg.port);
    let e = store::publish(&image, &r, &meta("c"), None, &opts()).unwrap_err();
    assert!(matches!(e, StoreError::Unauthorized { .. }), "{e}");
    let bad = StoreOptions {
        credentials: Some(Credentials {
            username: "kiln".into(),
            password: "wrong".into(),
        }),
        ..Default::default()
    };
    let e = store::publish(&image, &r, &meta("c"), None, &bad).unwrap_err();
    assert!(matches!(e, StoreError::Unauthorized { .. }), "{e}");
    let good = StoreOptions {
        credentials: Some(Credentials {
            username: "kiln".into(),
            password: "s3cret".into(),
        }),
        ..Default::default()
    };
    store::publish(&image, &r, &meta("c"), None, &good).unwrap();
    let out = work.path().join("out.raw");
    store::pull(&r, &out, None, &good).unwrap();
    assert_eq!(sha256_digest(&out), sha256_digest(&image));
    let list = store::images(&format!("127.0.0.1:{}", reg.port), &good).unwrap();
    assert_eq!(list.len(), 1);
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// `cargo test --release --test store -- --ignored --nocapture pull_throughput`
#[test]
#[ignore]
fn pull_throughput_against_curl() {
    let reg = start_registry(None);
    let work = tempfile::tempdir().unwrap();
    let image = work.path().join("disk.raw");
    let size = 256 * MIB;
    make_image(&image, size, 6);
    let r = format!("127.0.0.1:{}/kiln/img:v1", reg.port);
    let t = Instant::now();
    let rep = store::publish(&image, &r, &meta("c"), None, &opts()).unwrap();
    let push = t.elapsed().as_secs_f64();
    let url = format!(
        "http://127.0.0.1:{}/v2/kiln/img/blobs/{}",
        reg.port, rep.layer_digest
    );
    let out = work.path().join("out.raw");
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let _ = std::fs::remove_file(&out);
        let t = Instant::now();
        store::pull(&r, &out, None, &opts()).unwrap();
        ours.push(t.elapsed().as_secs_f64());
        let _ = std::fs::remove_file(&out);
        let t = Instant::now();
        curl(&["-o", out.to_str().unwrap(), &url]);
        theirs.push(t.elapsed().as_secs_f64());
    }
    let (a, b) = (median(ours), median(theirs));
    let mib = (size / MIB) as f64;
    println!(
        "push {:.0} MiB/s; pull {:.0} MiB/s (median of 5, incl. sha256 verify), curl -o {:.0} MiB/s; ratio {:.2}",
        mib / push,
        mib / a,
        mib / b,
        a / b
    );
}

fn b64url(bytes: &[u8]) -> String {
    let mut child = Command::new("basenc")
        .args(["--base64url", "-w0"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .trim_end_matches('=')
        .to_string()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else {
            out.push(if b[i] == b'+' { b' ' } else { b[i] });
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

/// A token service for distribution's `token` auth: answers `GET /token?service=…&scope=…` with
/// an RS256 JWT (signed by `openssl dgst`, certificate in `x5c`) granting the scope asked for,
/// when the request carries the right basic-auth user. Counts the tokens it issued.
fn start_token_service(dir: &Path) -> (u16, Arc<AtomicU64>, PathBuf) {
    let key = dir.join("token.key");
    let cert = dir.join("token.crt");
    let st = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-subj", "/CN=kiln-test-token", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let der = Command::new("openssl")
        .args(["x509", "-outform", "DER", "-in"])
        .arg(&cert)
        .output()
        .unwrap()
        .stdout;
    let x5c = {
        let mut child = Command::new("basenc")
            .args(["--base64", "-w0"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&der).unwrap();
        String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap()
    };
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let issued = Arc::new(AtomicU64::new(0));
    let count = issued.clone();
    let dir = dir.to_path_buf();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut req = Vec::new();
            let mut buf = [0u8; 4096];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let req = String::from_utf8_lossy(&req).to_string();
            // "kiln:s3cret" in basic auth.
            let authorized = req
                .to_ascii_lowercase()
                .contains("authorization: basic a2lsbjpzm2nyzxq=");
            let path = req.split_whitespace().nth(1).unwrap_or("").to_string();
            let query = path.split_once('?').map(|(_, q)| q).unwrap_or("");
            let mut access = Vec::new();
            for (k, v) in query.split('&').filter_map(|kv| kv.split_once('=')) {
                if k == "scope" {
                    let scope = percent_decode(v);
                    let mut parts = scope.splitn(3, ':');
                    let (t, n, a) = (parts.next(), parts.next(), parts.next());
                    if let (Some(t), Some(n), Some(a)) = (t, n, a) {
                        access.push(serde_json::json!({
                            "type": t, "name": n,
                            "actions": a.split(',').collect::<Vec<_>>()
                        }));
                    }
                }
            }
            let response = if authorized {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_secs();
                let header = serde_json::json!({"alg": "RS256", "typ": "JWT", "x5c": [x5c]});
                let claims = serde_json::json!({
                    "iss": "kiln-test-issuer", "sub": "kiln", "aud": "kiln-test-registry",
                    "exp": now + 300, "nbf": now - 10, "iat": now - 10,
                    "jti": format!("t{}", count.load(Ordering::SeqCst)), "access": access,
                });
                let input = format!(
                    "{}.{}",
                    b64url(header.to_string().as_bytes()),
                    b64url(claims.to_string().as_bytes())
                );
                let n = count.fetch_add(1, Ordering::SeqCst);
                let input_path = dir.join(format!("jwt-input-{n}"));
                std::fs::write(&input_path, &input).unwrap();
                let sig = Command::new("openssl")
                    .args(["dgst", "-sha256", "-sign"])
                    .arg(&key)
                    .arg(&input_path)
                    .output()
                    .unwrap()
                    .stdout;
                let body =
                    serde_json::json!({"token": format!("{input}.{}", b64url(&sig))}).to_string();
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
            } else {
                "HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    .to_string()
            };
            let _ = conn.write_all(response.as_bytes());
        }
    });
    (port, issued, cert)
}

#[test]
fn bearer_token_auth_flow() {
    let work = tempfile::tempdir().unwrap();
    let (token_port, issued, cert) = start_token_service(work.path());
    let root = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = format!(
        "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\nauth:\n  token:\n    realm: http://127.0.0.1:{token_port}/token\n    service: kiln-test-registry\n    issuer: kiln-test-issuer\n    rootcertbundle: {}\n",
        root.path().join("data").display(),
        cert.display()
    );
    let cfg = root.path().join("config.yml");
    std::fs::write(&cfg, config).unwrap();
    let child = Command::new("/usr/bin/docker-registry")
        .arg("serve")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(root.path().join("registry.log")).unwrap())
        .spawn()
        .unwrap();
    let reg = RegistryServer {
        child: Running::new(child),
        port,
        root,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = Command::new("curl")
            .args(["-s", "-D", "-", "-o", "/dev/null"])
            .arg(format!("http://127.0.0.1:{port}/v2/"))
            .output()
            .unwrap();
        let head = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
        if head.contains("401") {
            assert!(head.contains("www-authenticate: bearer realm="), "{head}");
            break;
        }
        assert!(Instant::now() < deadline, "registry did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let image = work.path().join("disk.raw");
    make_image(&image, 2 * MIB, 7);
    let r = format!("127.0.0.1:{}/kiln/img:v1", reg.port);
    let e = store::publish(&image, &r, &meta("c"), None, &opts()).unwrap_err();
    assert!(matches!(e, StoreError::Unauthorized { .. }), "{e}");
    let good = StoreOptions {
        credentials: Some(Credentials {
            username: "kiln".into(),
            password: "s3cret".into(),
        }),
        ..Default::default()
    };
    let (sk, vk) = keypair(work.path(), "k");
    store::publish(&image, &r, &meta("c"), Some(&sk), &good).unwrap();
    let out = work.path().join("out.raw");
    let pr = store::pull(&r, &out, Some(&vk), &good).unwrap();
    assert!(matches!(pr.signature, SignatureCheck::Verified { .. }));
    assert_eq!(sha256_digest(&out), sha256_digest(&image));
    assert!(issued.load(Ordering::SeqCst) >= 2);
    let list = store::images(&format!("127.0.0.1:{}/kiln/img", reg.port), &good).unwrap();
    assert_eq!(list.len(), 1);
}

// ---------------------------------------------------------------------------------------------
// A registry that misbehaves (tests/common's fake registry): stalls, answers longer than the
// manifest declares, a layer larger than the free disk.

const FAKE_REPO: &str = "kiln/img";

/// A kiln image's manifest and config for a raw disk layer with digest `layer` of `size` bytes.
fn fake_image(layer: &Digest256, size: u64) -> (Vec<u8>, Vec<u8>, Digest256) {
    let config = serde_json::to_vec(&store::ImageConfig {
        kiln_version: "test".into(),
        recipe: "fake".into(),
        format: "raw".into(),
    })
    .unwrap();
    let config_digest = Digest256::of(&config);
    let descriptor = |media_type: &str, digest: Digest256, size: u64| store::Descriptor {
        media_type: media_type.into(),
        digest,
        size,
        artifact_type: None,
        annotations: Default::default(),
    };
    let manifest = store::OciManifest {
        schema_version: 2,
        media_type: Some(store::registry::OCI_MANIFEST.into()),
        artifact_type: Some(store::ARTIFACT_DISK.into()),
        config: descriptor(
            store::MEDIA_CONFIG,
            config_digest.clone(),
            config.len() as u64,
        ),
        layers: vec![descriptor(store::MEDIA_DISK_RAW, layer.clone(), size)],
        subject: None,
        annotations: Default::default(),
    };
    (
        serde_json::to_vec(&manifest).unwrap(),
        config,
        config_digest,
    )
}

/// The fake registry serving one image `kiln/img:v1`: the manifest, the config, and the layer
/// blob answered by `layer()` (everything else: 404).
fn fake_registry(
    layer_digest: &Digest256,
    size: u64,
    manifest_answer: Option<fn(Vec<u8>) -> common::registry::Answer>,
    layer: impl Fn() -> common::registry::Answer + Send + Sync + 'static,
) -> common::registry::FakeRegistry {
    use common::registry::Answer;
    let (manifest, config, config_digest) = fake_image(layer_digest, size);
    let config_path = format!("/v2/{FAKE_REPO}/blobs/{config_digest}");
    let layer_path = format!("/v2/{FAKE_REPO}/blobs/{layer_digest}");
    let manifest_path = format!("/v2/{FAKE_REPO}/manifests/v1");
    common::registry::start_fake_registry(move |_method, path| {
        if path == manifest_path {
            match manifest_answer {
                Some(f) => f(manifest.clone()),
                None => Answer::Body {
                    content_type: store::registry::OCI_MANIFEST,
                    body: manifest.clone(),
                    digest: None,
                },
            }
        } else if path == config_path {
            Answer::Body {
                content_type: "application/octet-stream",
                body: config.clone(),
                digest: None,
            }
        } else if path == layer_path {
            layer()
        } else {
            Answer::Status(404)
        }
    })
}

fn random_layer(size: u64) -> (Vec<u8>, Digest256) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("layer");
    make_image(&path, size, 11);
    let bytes = std::fs::read(&path).unwrap();
    let digest = Digest256::of(&bytes);
    (bytes, digest)
}

#[test]
fn kiln_pull_fails_within_the_stall_timeout_when_the_registry_trickles() {
    let (layer, digest) = random_layer(MIB);
    // Headers at once, then one byte of the manifest every 3 s (minutes for all of it).
    let fake = fake_registry(
        &digest,
        layer.len() as u64,
        Some(|body| common::registry::Answer::Trickle {
            body,
            first: 0,
            every: Duration::from_secs(3),
        }),
        move || common::registry::Answer::Status(404),
    );
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("disk.raw");
    let started = Instant::now();
    let o = common::kiln(&work.path().join("home"))
        .args([
            "pull",
            &format!("127.0.0.1:{}/{FAKE_REPO}:v1", fake.port),
            "-o",
        ])
        .arg(&out)
        .env("KILN_STALL_TIMEOUT", "2")
        .output()
        .unwrap();
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&o.stderr);
    eprintln!("after {took:.2?}: {stderr}");
    assert!(!o.status.success());
    assert!(
        stderr.contains("the registry stalled (sent nothing for 2.0 s)"),
        "{stderr}"
    );
    assert!(stderr.contains("manifest v1"), "{stderr}");
    assert!(stderr.contains("KILN_STALL_TIMEOUT"), "{stderr}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert!(!out.exists());
}

#[test]
fn pull_stalled_mid_layer_keeps_the_partial_and_resumes() {
    let (layer, digest) = random_layer(4 * MIB);
    let stall = Arc::new(AtomicBool::new(true));
    let (bytes, s) = (layer.clone(), stall.clone());
    let fake = fake_registry(&digest, layer.len() as u64, None, move || {
        if s.load(Ordering::SeqCst) {
            // The first MiB at once, then a byte every 3 s.
            common::registry::Answer::Trickle {
                body: bytes.clone(),
                first: MIB as usize,
                every: Duration::from_secs(3),
            }
        } else {
            common::registry::Answer::Body {
                content_type: "application/octet-stream",
                body: bytes.clone(),
                digest: None,
            }
        }
    });
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("disk.raw");
    let reference = format!("127.0.0.1:{}/{FAKE_REPO}:v1", fake.port);
    let opts = StoreOptions {
        stall_timeout: Some(Duration::from_secs(2)),
        ..StoreOptions::default()
    };
    let started = Instant::now();
    let err = store::pull(&reference, &out, None, &opts).unwrap_err();
    let took = started.elapsed();
    let msg = err.to_string();
    eprintln!("after {took:.2?}: {msg}");
    assert!(matches!(err, StoreError::Stalled { .. }), "{msg}");
    for want in [
        "the registry stalled (sent nothing for 2.0 s)",
        &format!("disk blob {digest}"),
        "kept in",
        "run the pull again to resume",
    ] {
        assert!(msg.contains(want), "{want:?} not in {msg}");
    }
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert!(!out.exists());
    let partial = store::partial_path(&out);
    let kept = std::fs::metadata(&partial).unwrap().len();
    assert!(kept <= layer.len() as u64, "{kept}");
    // The registry recovers: the pull completes and the disk is the layer.
    stall.store(false, Ordering::SeqCst);
    let report = store::pull(&reference, &out, None, &opts).unwrap();
    assert_eq!(report.layer_digest, digest);
    assert_eq!(std::fs::read(&out).unwrap(), layer);
}

#[test]
fn pull_refuses_a_layer_longer_than_its_descriptor() {
    let (layer, digest) = random_layer(MIB);
    let mut longer = layer.clone();
    longer.extend(std::iter::repeat_n(0u8, 4 * MIB as usize));
    for announced in [true, false] {
        let body = longer.clone();
        let fake = fake_registry(&digest, layer.len() as u64, None, move || {
            if announced {
                common::registry::Answer::Body {
                    content_type: "application/octet-stream",
                    body: body.clone(),
                    digest: None,
                }
            } else {
                common::registry::Answer::Unsized(body.clone())
            }
        });
        let work = tempfile::tempdir().unwrap();
        let out = work.path().join("disk.raw");
        let reference = format!("127.0.0.1:{}/{FAKE_REPO}:v1", fake.port);
        let err = store::pull(&reference, &out, None, &opts()).unwrap_err();
        let msg = err.to_string();
        eprintln!("Content-Length sent: {announced}: {msg}");
        assert!(matches!(err, StoreError::Oversized { .. }), "{msg}");
        assert!(
            msg.contains(&format!(
                "sent more than the {} bytes the manifest declares",
                layer.len()
            )),
            "{msg}"
        );
        // Nothing left: no output, no partial download.
        assert!(!out.exists());
        assert!(!store::partial_path(&out).exists());
    }
}

#[test]
fn pull_refuses_a_layer_larger_than_the_free_space_before_downloading() {
    let (_, digest) = random_layer(MIB);
    let huge: u64 = 1 << 50;
    let fake = fake_registry(&digest, huge, None, || {
        common::registry::Answer::Status(500)
    });
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("disk.raw");
    let reference = format!("127.0.0.1:{}/{FAKE_REPO}:v1", fake.port);
    let err = store::pull(&reference, &out, None, &opts()).unwrap_err();
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(matches!(err, StoreError::NoSpace { .. }), "{msg}");
    assert!(
        msg.contains(&format!("needs {huge} more bytes in")),
        "{msg}"
    );
    assert!(msg.contains(&work.path().display().to_string()), "{msg}");
    assert!(msg.contains("free some space"), "{msg}");
    let asked = fake.requests.lock().unwrap().clone();
    assert!(
        !asked.iter().any(|r| r.contains(&digest.to_string())),
        "the layer was requested: {asked:?}"
    );
    assert!(!store::partial_path(&out).exists());
}
