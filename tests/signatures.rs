//! Image signatures in cosign's format, checked by cosign itself (`cosign verify --key`, the
//! Debian package from trixie that `.ci/setup` pins) against the Debian `docker-registry`:
//! - images signed with an ECDSA P-256 and an Ed25519 key from `kiln keygen --type` verify with
//!   cosign and with `kiln pull --trust`; another key, an unsigned image and a manifest changed
//!   after signing are refused by both;
//! - an image signed in kiln's old format is refused by `kiln pull --trust` with the way out
//!   (`kiln sign`), which then makes it verify with cosign; a second key's signature is added
//!   beside the first, and the same key and image give the same signature bytes.
//!
//! - a build published by `kiln up --publish-to --key` carries an SPDX SBOM and a SLSA provenance
//!   attestation, and the verify stage's boot attestation: `cosign verify-attestation` accepts
//!   the first two with the project key (not another), the SPDX project's `pyspdxtools`
//!   validates the document, whose packages are the ones the build fetched, Python's
//!   `cryptography` checks each DSSE envelope (the boot one with the verifier key), and `kiln
//!   verify` and `kiln sbom` agree; an envelope changed in the registry is refused by kiln and
//!   cosign. (cosign cannot check the boot attestation: its subject is the disk, which is all the
//!   verify stage knows, and cosign wants the manifest's digest.)
//!
//! - containers/image's `sigstoreSigned` policy, in skopeo, accepts kiln's images with both key
//!   types and refuses another key, an unsigned image and a moved tag. Debian 12's skopeo is built
//!   with sigstore disabled, so this is Debian 13's, in a small root `.ci/setup` makes.

mod common;
use common::registry::start_registry;
use common::{curl, kiln_no_home as kiln, output};
use std::path::Path;
use std::process::{Command, Output};

const BOOT: &str = "https://kiln.invalid/attestation/boot/v1";
const ACCEPT_OCI: &str = "Accept: application/vnd.oci.image.manifest.v1+json";

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `cosign SUBCOMMAND` with no transparency log, plain http to the loopback registry, its state
/// in `home`, and no way out: any address but loopback would go to a proxy that is not there.
fn cosign(subcommand: &str, home: &Path) -> Command {
    let mut c = Command::new("cosign");
    c.args([
        subcommand,
        "--insecure-ignore-tlog",
        "--allow-http-registry",
    ])
    .env("HOME", home)
    .env("TUF_ROOT", home.join("tuf"))
    .env("HTTPS_PROXY", "http://127.0.0.1:9")
    .env("HTTP_PROXY", "http://127.0.0.1:9")
    .env("NO_PROXY", "127.0.0.1");
    c
}

/// `cosign verify --key PUB REF`.
fn cosign_verify(public: &Path, reference: &str, home: &Path) -> Output {
    cosign("verify", home)
        .arg("--key")
        .arg(public)
        .arg(reference)
        .output()
        .expect("cosign (Debian package cosign, from trixie) must be installed")
}

/// Publish `image` to `reference` (signed with `key` if given); the manifest digest.
fn publish(image: &Path, reference: &str, key: Option<&Path>) -> String {
    let mut c = kiln();
    c.arg("publish")
        .arg(image)
        .args(["--to", reference, "--json"]);
    if let Some(k) = key {
        c.arg("--key").arg(k);
    }
    let o = output(&mut c);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["manifest_digest"].as_str().unwrap().to_string()
}

/// The Debian 13 root holding skopeo (see `.ci/setup`).
const SKOPEO_ROOT: &str = "/var/tmp/kiln-test-tools/skopeo-trixie";

/// `skopeo copy docker://REFERENCE dir:…` inside [`SKOPEO_ROOT`], with a policy that accepts the
/// registry's images only when signed (cosign's format, `use-sigstore-attachments`) by `public`.
fn skopeo_copy(public: &Path, reference: &str) -> Output {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let root = Path::new(SKOPEO_ROOT);
    assert!(
        root.join("usr/bin/skopeo").is_file(),
        "{SKOPEO_ROOT}/usr/bin/skopeo: .ci/setup makes it"
    );
    let inner = format!(
        "/kiln-test/{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    );
    let dir = root.join(inner.trim_start_matches('/'));
    std::fs::create_dir_all(dir.join("registries.d")).unwrap();
    std::fs::copy(public, dir.join("key.pub")).unwrap();
    let host = reference.split('/').next().unwrap();
    let policy = serde_json::json!({
        "default": [{"type": "reject"}],
        "transports": {"docker": {host: [{
            "type": "sigstoreSigned",
            "keyPath": format!("{inner}/key.pub"),
            "signedIdentity": {"type": "matchRepository"},
        }]}},
    });
    std::fs::write(dir.join("policy.json"), policy.to_string()).unwrap();
    std::fs::write(
        dir.join("registries.d/default.yaml"),
        format!("docker:\n  {host}:\n    use-sigstore-attachments: true\n"),
    )
    .unwrap();
    let o = output(
        Command::new("chroot")
            .arg(root)
            .args(["skopeo", "--policy"])
            .arg(format!("{inner}/policy.json"))
            .arg("--registries.d")
            .arg(format!("{inner}/registries.d"))
            .args(["copy", "--src-tls-verify=false"])
            .arg(format!("docker://{reference}"))
            .arg(format!("dir:{inner}/copy")),
    );
    std::fs::remove_dir_all(&dir).unwrap();
    o
}

fn pull(reference: &str, out: &Path, trust: &Path) -> Output {
    output(
        kiln()
            .args(["pull", reference, "-o"])
            .arg(out)
            .arg("--trust")
            .arg(trust),
    )
}

#[test]
fn cosign_verifies_what_kiln_signs_and_refuses_what_it_must() {
    let reg = start_registry(None);
    let host = format!("127.0.0.1:{}", reg.port);
    let work = tempfile::tempdir().unwrap();
    let w = |name: &str| work.path().join(name);
    let cosign_home = w("cosign-home");
    std::fs::create_dir(&cosign_home).unwrap();

    for (name, kind) in [
        ("ecdsa", "ecdsa-p256"),
        ("ed", "ed25519"),
        ("other", "ecdsa-p256"),
    ] {
        let o = output(
            kiln()
                .args(["keygen", "--type", kind, "-o"])
                .arg(w(&format!("{name}.key"))),
        );
        assert!(o.status.success(), "{}", text(&o));
        assert!(
            String::from_utf8_lossy(&o.stdout).contains(kind),
            "{}",
            text(&o)
        );
    }
    let public = |name: &str| w(&format!("{name}.key.pub"));
    let secret = |name: &str| w(&format!("{name}.key"));
    let image = w("disk.raw");
    std::fs::write(
        &image,
        b"kiln disk image bytes for the signature test\n".repeat(1000),
    )
    .unwrap();

    for name in ["ecdsa", "ed"] {
        let repo = format!("{host}/kiln/app-{name}");
        let digest = publish(&image, &format!("{repo}:v1"), Some(&secret(name)));
        let by_digest = format!("{repo}@{digest}");

        // cosign accepts it, and reads the payload kiln wrote.
        let o = cosign_verify(&public(name), &by_digest, &cosign_home);
        assert!(o.status.success(), "cosign verify ({name}): {}", text(&o));
        let payloads: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(
            payloads[0]["critical"]["image"]["docker-manifest-digest"],
            digest.as_str()
        );
        assert_eq!(
            payloads[0]["critical"]["identity"]["docker-reference"],
            repo
        );
        assert_eq!(
            payloads[0]["critical"]["type"],
            "cosign container image signature"
        );
        // By tag too.
        let o = cosign_verify(&public(name), &format!("{repo}:v1"), &cosign_home);
        assert!(o.status.success(), "{}", text(&o));
        // skopeo's sigstoreSigned policy accepts it with this key, not with another.
        let o = skopeo_copy(&public(name), &format!("{repo}:v1"));
        assert!(o.status.success(), "skopeo copy ({name}): {}", text(&o));
        let o = skopeo_copy(&public("other"), &format!("{repo}:v1"));
        assert!(
            !o.status.success(),
            "skopeo accepted another key: {}",
            text(&o)
        );
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("signature verification failed"),
            "{}",
            text(&o)
        );
        // Another key: refused by cosign and by kiln.
        let o = cosign_verify(&public("other"), &by_digest, &cosign_home);
        assert!(
            !o.status.success(),
            "cosign accepted another key: {}",
            text(&o)
        );
        let out = w("pulled.raw");
        let o = pull(&by_digest, &out, &public("other"));
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("trusted key"),
            "{}",
            text(&o)
        );
        assert!(!out.exists());
        // The right key: kiln pulls it, the same bytes.
        let o = pull(&by_digest, &out, &public(name));
        assert!(o.status.success(), "{}", text(&o));
        assert!(String::from_utf8_lossy(&o.stdout).contains("signature verified"));
        assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&image).unwrap());
        std::fs::remove_file(&out).unwrap();
    }

    // The same key and image give the same signature manifest (deterministic signatures).
    let sig_of = |repo: &str, digest: &str| {
        let tag = format!("sha256-{}.sig", digest.trim_start_matches("sha256:"));
        curl(&[
            "-s",
            "-H",
            ACCEPT_OCI,
            &format!("http://{host}/v2/{repo}/manifests/{tag}"),
        ])
    };
    let first = sig_of(
        "kiln/app-ecdsa",
        &publish(&image, &format!("{host}/kiln/app-ecdsa:v1"), None),
    );
    let digest = publish(
        &image,
        &format!("{host}/kiln/app-ecdsa:v1"),
        Some(&secret("ecdsa")),
    );
    assert_eq!(sig_of("kiln/app-ecdsa", &digest), first);

    // Unsigned: refused by both.
    let unsigned = w("unsigned.raw");
    std::fs::write(&unsigned, b"another disk\n".repeat(500)).unwrap();
    let repo = format!("{host}/kiln/plain");
    let digest = publish(&unsigned, &format!("{repo}:v1"), None);
    let o = cosign_verify(&public("ecdsa"), &format!("{repo}@{digest}"), &cosign_home);
    assert!(!o.status.success(), "{}", text(&o));
    let o = skopeo_copy(&public("ecdsa"), &format!("{repo}:v1"));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("Source image rejected"),
        "skopeo accepted an unsigned image: {}",
        text(&o)
    );
    let o = pull(&format!("{repo}:v1"), &w("u.raw"), &public("ecdsa"));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("has no signature"),
        "{}",
        text(&o)
    );

    // The manifest changed after signing: the tag now names an unsigned manifest, and the old
    // signature copied to its signature tag names the other digest. Refused by both.
    let repo = format!("{host}/kiln/moved");
    let signed = publish(&image, &format!("{repo}:v1"), Some(&secret("ecdsa")));
    let moved = publish(&unsigned, &format!("{repo}:v1"), None);
    let sig = sig_of("kiln/moved", &signed);
    put_manifest(
        &format!(
            "http://{host}/v2/kiln/moved/manifests/sha256-{}.sig",
            moved.trim_start_matches("sha256:")
        ),
        &sig,
        &w("sig.json"),
    );
    let o = cosign_verify(&public("ecdsa"), &format!("{repo}:v1"), &cosign_home);
    assert!(
        !o.status.success(),
        "cosign accepted a moved tag: {}",
        text(&o)
    );
    let o = skopeo_copy(&public("ecdsa"), &format!("{repo}:v1"));
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("Source image rejected"),
        "skopeo accepted a moved tag: {}",
        text(&o)
    );
    let o = pull(&format!("{repo}:v1"), &w("m.raw"), &public("ecdsa"));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("the manifest changed after signing"),
        "{}",
        text(&o)
    );
}

#[test]
fn an_old_format_signature_is_named_and_replaced_and_wrong_attestations_are_refused() {
    let reg = start_registry(None);
    let host = format!("127.0.0.1:{}", reg.port);
    let work = tempfile::tempdir().unwrap();
    let w = |name: &str| work.path().join(name);
    let cosign_home = w("cosign-home");
    std::fs::create_dir(&cosign_home).unwrap();
    for (name, kind) in [("ecdsa", "ecdsa-p256"), ("ed", "ed25519")] {
        let o = output(
            kiln()
                .args(["keygen", "--type", kind, "-o"])
                .arg(w(&format!("{name}.key"))),
        );
        assert!(o.status.success(), "{}", text(&o));
    }
    let image = w("disk.raw");
    std::fs::write(&image, b"an image signed long ago\n".repeat(800)).unwrap();
    let repo = format!("{host}/kiln/legacy");
    let digest = publish(&image, &format!("{repo}:v1"), None);
    let hex = digest.trim_start_matches("sha256:");

    // A signature as kiln wrote them before cosign's format: its own artifact type and payload.
    let payload = format!(
        "{{\"type\":\"dev.kiln.signature.v1\",\"manifest_digest\":\"{digest}\",\
         \"repository\":\"kiln/legacy\",\"tags\":[\"v1\"],\"created\":\"1970-01-01T00:00:00Z\"}}"
    );
    let put_blob = |bytes: &[u8]| push_blob(&host, "kiln/legacy", bytes, &w("blob"));
    let payload_digest = put_blob(payload.as_bytes());
    let empty = put_blob(b"{}");
    let old = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": "application/vnd.kiln.signature.v1",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
        "layers": [{
            "mediaType": "application/vnd.kiln.signature.payload.v1+json",
            "digest": payload_digest,
            "size": payload.len(),
            "annotations": {"dev.kiln.signature": "00".repeat(64)},
        }],
    });
    let old_file = w("old.json");
    put_manifest(
        &format!("http://{host}/v2/kiln/legacy/manifests/sha256-{hex}.sig"),
        &serde_json::to_vec(&old).unwrap(),
        &old_file,
    );

    let o = pull(&format!("{repo}:v1"), &w("p.raw"), &w("ecdsa.key.pub"));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let said = String::from_utf8_lossy(&o.stderr);
    assert!(
        said.contains("old signature format") && said.contains("kiln sign"),
        "{}",
        text(&o)
    );

    // Re-signed: kiln and cosign accept it.
    let o = output(
        kiln()
            .args(["sign", &format!("{repo}:v1"), "--json", "--key"])
            .arg(w("ecdsa.key")),
    );
    assert!(o.status.success(), "{}", text(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["manifest_digest"], digest.as_str());
    assert_eq!(report["key_type"], "ecdsa-p256");
    let o = pull(&format!("{repo}:v1"), &w("p.raw"), &w("ecdsa.key.pub"));
    assert!(o.status.success(), "{}", text(&o));
    let o = cosign_verify(
        &w("ecdsa.key.pub"),
        &format!("{repo}@{digest}"),
        &cosign_home,
    );
    assert!(o.status.success(), "{}", text(&o));

    // A second key's signature goes beside the first: both verify, with kiln and with cosign.
    let o = output(
        kiln()
            .args(["sign", &format!("{repo}@{digest}"), "--key"])
            .arg(w("ed.key")),
    );
    assert!(o.status.success(), "{}", text(&o));
    for key in ["ecdsa", "ed"] {
        let public = w(&format!("{key}.key.pub"));
        let o = cosign_verify(&public, &format!("{repo}@{digest}"), &cosign_home);
        assert!(o.status.success(), "{key}: {}", text(&o));
        std::fs::remove_file(w("p.raw")).ok();
        let o = pull(&format!("{repo}:v1"), &w("p.raw"), &public);
        assert!(o.status.success(), "{key}: {}", text(&o));
    }
    let sig = curl(&[
        "-s",
        "-H",
        ACCEPT_OCI,
        &format!("http://{host}/v2/kiln/legacy/manifests/sha256-{hex}.sig"),
    ]);
    let sig: serde_json::Value = serde_json::from_slice(&sig).unwrap();
    assert_eq!(sig["layers"].as_array().unwrap().len(), 2, "{sig}");

    // Attestations that are signed by the key but wrong are refused, naming what is wrong.
    use kiln::store::attest::{Envelope, PAYLOAD_IN_TOTO, PREDICATE_SPDX, Statement};
    let key = kiln::store::load_signing_key(&w("ecdsa.key")).unwrap();
    let manifest = kiln::digest::Digest256::parse(&digest).unwrap();
    let name = kiln::store::subject_name(&format!("{repo}:v1")).unwrap();
    let doc = |n: u32| serde_json::json!({"spdxVersion": "SPDX-2.3", "packages": [], "n": n});
    let statement = |about: &kiln::digest::Digest256, n: u32| {
        Statement::new(&name, about, PREDICATE_SPDX, doc(n))
    };
    let opts = kiln::store::StoreOptions::default();
    kiln::store::attach(
        &format!("{repo}:v1"),
        &key,
        &[statement(&manifest, 1)],
        &[],
        &opts,
    )
    .unwrap();
    let verify_sbom = || {
        output(
            kiln()
                .args([
                    "verify",
                    &format!("{repo}@{digest}"),
                    "--require",
                    "sbom",
                    "--key",
                ])
                .arg(w("ecdsa.key.pub")),
        )
    };
    let o = verify_sbom();
    assert!(o.status.success(), "{}", text(&o));
    // A second, different SBOM beside the first, as a registry or a second publisher could add.
    let att_url = format!("http://{host}/v2/kiln/legacy/manifests/sha256-{hex}.att");
    let att: serde_json::Value =
        serde_json::from_slice(&curl(&["-H", ACCEPT_OCI, &att_url])).unwrap();
    let add_layer = |st: &Statement| {
        let envelope = Envelope::seal(&key, PAYLOAD_IN_TOTO, &serde_json::to_vec(st).unwrap());
        let bytes = serde_json::to_vec(&envelope).unwrap();
        let d = push_blob(&host, "kiln/legacy", &bytes, &w("blob"));
        let mut m = att.clone();
        let mut layer = m["layers"][0].clone();
        layer["digest"] = d.into();
        layer["size"] = bytes.len().into();
        m["layers"].as_array_mut().unwrap().push(layer);
        put_manifest(&att_url, &serde_json::to_vec(&m).unwrap(), &w("att.json"));
    };
    add_layer(&statement(&manifest, 2));
    let o = verify_sbom();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("two different"),
        "{}",
        text(&o)
    );
    // A signed SBOM about another image: refused, naming the digest it is about.
    let other = kiln::digest::Digest256::of(b"another image");
    add_layer(&statement(&other, 1));
    let o = verify_sbom();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(other.hex()),
        "{}",
        text(&o)
    );
}

/// `cosign verify-attestation --key PUB --type TYPE REF`.
fn cosign_attestations(public: &Path, kind: &str, reference: &str, home: &Path) -> Output {
    cosign("verify-attestation", home)
        .args(["--type", kind, "--key"])
        .arg(public)
        .arg(reference)
        .output()
        .expect("cosign (Debian package cosign, from trixie) must be installed")
}

/// The in-toto Statements in cosign's output (one DSSE envelope per line).
fn statements(o: &Output) -> Vec<serde_json::Value> {
    use base64::Engine as _;
    common::json_lines(o)
        .iter()
        .map(|env| {
            let payload = base64::engine::general_purpose::STANDARD
                .decode(env["payload"].as_str().unwrap())
                .unwrap();
            serde_json::from_slice(&payload).unwrap()
        })
        .collect()
}

/// A DSSE check that is not kiln's: Python's `cryptography` verifies the envelope's signature
/// over the pre-authentication encoding with the public key file.
const DSSE_CHECK: &str = r#"
import base64, json, sys
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
env = json.load(open(sys.argv[1]))
key = serialization.load_pem_public_key(open(sys.argv[2], "rb").read())
payload = base64.b64decode(env["payload"])
t = env["payloadType"].encode()
pae = b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)
for s in env["signatures"]:
    key.verify(base64.b64decode(s["sig"]), pae, ec.ECDSA(hashes.SHA256()))
print(json.loads(payload)["predicateType"])
"#;

#[test]
fn a_published_build_carries_an_sbom_provenance_and_boot_attestation_that_others_check() {
    use common::{Running, json_lines, shared_home};
    use std::process::Stdio;
    let home = shared_home();
    let work = tempfile::tempdir().unwrap();
    let w = |name: &str| work.path().join(name);
    let cosign_home = w("cosign-home");
    std::fs::create_dir(&cosign_home).unwrap();
    let reg = start_registry(None);
    let host = format!("127.0.0.1:{}", reg.port);
    let server = kiln::bus::PrivateServer::start().unwrap();
    let url = server.url();
    for name in ["images", "other"] {
        let o = output(
            common::kiln(home.path())
                .args(["keygen", "-o"])
                .arg(w(&format!("{name}.key"))),
        );
        assert!(o.status.success(), "{}", text(&o));
    }
    let public = w("images.key.pub");
    let up_log = w("up.log");
    let _up = {
        let mut c = common::kiln(home.path());
        c.args(["up", "--nats", &url, "--publish-to", &host, "--key"])
            .arg(w("images.key"))
            .args(common::recipe_roots())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&up_log).unwrap());
        Running::new(c.spawn().unwrap())
    };
    let o = output(common::kiln(home.path()).args([
        "submit",
        "recipes/app.yaml",
        "--profile",
        "direct",
        "--set",
        "release=attested",
        "--follow",
        "--timeout",
        "600",
        "--json",
        "--nats",
        &url,
    ]));
    let log = || std::fs::read_to_string(&up_log).unwrap_or_default();
    assert!(o.status.success(), "{}\n{}", text(&o), log());
    let events = json_lines(&o);
    let published = &events.last().unwrap()["outputs"];
    let manifest = published["manifest"].as_str().unwrap().to_string();
    assert!(published["attestations"].as_str().is_some(), "{published}");
    let by_digest = format!("{host}/kiln/app@{manifest}");
    // What the rootfs stage fetched: the packages the SBOM must list.
    let rootfs = events
        .iter()
        .find(|e| e["kind"] == "completed" && e["stage"] == "rootfs")
        .unwrap();
    let mut fetched: Vec<String> = ["kernel", "busybox", "systemd_boot"]
        .iter()
        .map(|k| {
            rootfs["outputs"]["packages"][k]["name"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    fetched.sort();
    assert_eq!(published["sbom_packages"], fetched.len(), "{published}");

    // cosign checks both attestations with the project key and reads them.
    let o = cosign_attestations(&public, "spdxjson", &by_digest, &cosign_home);
    assert!(
        o.status.success(),
        "cosign verify-attestation spdxjson: {}",
        text(&o)
    );
    let spdx = statements(&o);
    assert_eq!(spdx.len(), 1, "{spdx:?}");
    assert_eq!(
        spdx[0]["subject"][0]["digest"]["sha256"],
        manifest.trim_start_matches("sha256:")
    );
    let doc = &spdx[0]["predicate"];
    let mut listed: Vec<String> = doc["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["SPDXID"].as_str().unwrap().starts_with("SPDXRef-deb-"))
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect();
    listed.sort();
    assert_eq!(listed, fetched);
    for p in doc["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["SPDXID"].as_str().unwrap().starts_with("SPDXRef-deb-"))
    {
        let purl = p["externalRefs"][0]["referenceLocator"].as_str().unwrap();
        assert!(
            purl.starts_with(&format!("pkg:deb/debian/{}@", p["name"].as_str().unwrap())),
            "{purl}"
        );
        assert!(purl.contains("arch=amd64"), "{purl}");
        assert!(
            p["sourceInfo"].as_str().unwrap().contains("source package"),
            "{p}"
        );
        let sha = rootfs["outputs"]["packages"]
            .as_object()
            .unwrap()
            .values()
            .find(|v| v["name"] == p["name"])
            .unwrap()["sha256"]
            .as_str()
            .unwrap()
            .trim_start_matches("sha256:")
            .to_string();
        assert_eq!(p["checksums"][0]["checksumValue"], sha.as_str(), "{p}");
    }
    let o = cosign_attestations(&public, "slsaprovenance1", &by_digest, &cosign_home);
    assert!(
        o.status.success(),
        "cosign verify-attestation slsaprovenance1: {}",
        text(&o)
    );
    let provenance = &statements(&o)[0]["predicate"];
    assert_eq!(
        provenance["runDetails"]["metadata"]["invocationId"],
        events[0]["build"]
    );
    let deps = provenance["buildDefinition"]["resolvedDependencies"].to_string();
    for name in &fetched {
        assert!(deps.contains(name.as_str()), "{name} not in {deps}");
    }
    // The signed InRelease the packages were chosen from: the bytes kiln verified and cached.
    let release = provenance["buildDefinition"]["resolvedDependencies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"].as_str().unwrap().starts_with("InRelease"))
        .unwrap_or_else(|| panic!("no InRelease in {deps}"));
    let uri = release["uri"].as_str().unwrap();
    assert!(uri.ends_with("/dists/bookworm/InRelease"), "{uri}");
    let cached: Vec<String> = common::walk(&home.path().join("debian"))
        .into_iter()
        .filter(|p| p.ends_with("InRelease"))
        .map(|p| common::sha256(&p))
        .collect();
    assert!(
        cached
            .iter()
            .any(|c| release["digest"]["sha256"] == c.as_str()),
        "{release} is none of the cached InRelease files {cached:?}"
    );
    // Another key: cosign refuses.
    let o = cosign_attestations(&w("other.key.pub"), "spdxjson", &by_digest, &cosign_home);
    assert!(!o.status.success(), "{}", text(&o));

    // The same document as a plain attachment (cosign's `.sbom` tag, a referrer elsewhere).
    let sbom: serde_json::Value = serde_json::from_slice(&curl(&[
        "-H",
        ACCEPT_OCI,
        &format!(
            "http://{host}/v2/kiln/app/manifests/sha256-{}.sbom",
            manifest.trim_start_matches("sha256:")
        ),
    ]))
    .unwrap();
    assert_eq!(sbom["artifactType"], "application/spdx+json", "{sbom}");
    assert_eq!(sbom["subject"]["digest"], manifest.as_str(), "{sbom}");
    let plain: serde_json::Value = serde_json::from_slice(&curl(&[&format!(
        "http://{host}/v2/kiln/app/blobs/{}",
        sbom["layers"][0]["digest"].as_str().unwrap()
    )]))
    .unwrap();
    assert_eq!(&plain, doc);

    // `kiln images` lists the image, not what is attached to it.
    let o =
        output(common::kiln(home.path()).args(["images", &format!("{host}/kiln/app"), "--json"]));
    assert!(o.status.success(), "{}", text(&o));
    let listed: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let tags: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["tag"].as_str().unwrap())
        .collect();
    assert_eq!(tags, ["latest"], "{listed}");

    // The SPDX project's own validator accepts the document.
    let spdx_file = w("app.spdx.json");
    std::fs::write(&spdx_file, serde_json::to_vec_pretty(doc).unwrap()).unwrap();
    let o = output(
        Command::new("/var/tmp/kiln-test-tools/bin/pyspdxtools")
            .arg("-i")
            .arg(&spdx_file),
    );
    assert!(
        o.status.success(),
        "pyspdxtools (.ci/setup installs it): {}",
        text(&o)
    );

    // The envelopes as stored, checked by Python's cryptography.
    let hex = manifest.trim_start_matches("sha256:");
    let att: serde_json::Value = serde_json::from_slice(&curl(&[
        "-H",
        ACCEPT_OCI,
        &format!("http://{host}/v2/kiln/app/manifests/sha256-{hex}.att"),
    ]))
    .unwrap();
    assert_eq!(att["subject"]["digest"], manifest.as_str(), "{att}");
    // The boot attestation is the verify stage's, signed with the verifier key of kiln up's home.
    let verifier = home.path().join("verifier.key.pub");
    let mut types = Vec::new();
    for (i, layer) in att["layers"].as_array().unwrap().iter().enumerate() {
        assert_eq!(layer["mediaType"], "application/vnd.dsse.envelope.v1+json");
        let kind = layer["annotations"]["predicateType"].as_str().unwrap();
        let signer = if kind == BOOT { &verifier } else { &public };
        let envelope = curl(&[&format!(
            "http://{host}/v2/kiln/app/blobs/{}",
            layer["digest"].as_str().unwrap()
        )]);
        let file = w(&format!("envelope-{i}.json"));
        std::fs::write(&file, &envelope).unwrap();
        let o = output(
            Command::new("python3")
                .args(["-c", DSSE_CHECK])
                .arg(&file)
                .arg(signer),
        );
        assert!(o.status.success(), "DSSE check of {kind}: {}", text(&o));
        types.push(String::from_utf8_lossy(&o.stdout).trim().to_string());
    }
    types.sort();
    assert_eq!(
        types,
        [
            BOOT,
            "https://slsa.dev/provenance/v1",
            "https://spdx.dev/Document"
        ]
    );

    // kiln verify and kiln sbom.
    let o = output(
        common::kiln(home.path())
            .args(["verify", &by_digest, "--json", "--key"])
            .arg(&public),
    );
    assert!(o.status.success(), "{}", text(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["ok"], true, "{report}");
    // Without a verifier key the boot attestation is not required, and cannot be checked.
    for c in report["checks"].as_array().unwrap() {
        let expected = if c["what"] == "boot" {
            "unverified"
        } else {
            "verified"
        };
        assert_eq!(c["status"], expected, "{report}");
    }
    let o = output(
        common::kiln(home.path())
            .args(["verify", &by_digest, "--json", "--key"])
            .arg(&public)
            .arg("--verifier-key")
            .arg(&verifier),
    );
    assert!(o.status.success(), "{}", text(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for c in report["checks"].as_array().unwrap() {
        assert_eq!(c["status"], "verified", "{report}");
        assert_eq!(c["required"], true, "{report}");
    }
    assert!(report.to_string().contains("booted to"), "{report}");
    // The same as text: one line per check.
    let o = output(
        common::kiln(home.path())
            .args(["verify", &by_digest, "--key"])
            .arg(&public)
            .arg("--verifier-key")
            .arg(&verifier),
    );
    assert!(o.status.success(), "{}", text(&o));
    let said = String::from_utf8_lossy(&o.stdout);
    eprintln!("kiln verify:\n{said}");
    for what in ["signature", "sbom", "provenance", "boot"] {
        assert!(
            said.lines()
                .any(|l| l.trim_start().starts_with("ok")
                    && l.split_whitespace().nth(1) == Some(what)),
            "{said}"
        );
    }
    // The project key is not a verifier key: the boot attestation does not verify with it.
    let o = output(
        common::kiln(home.path())
            .args(["verify", &by_digest, "--require", "boot", "--key"])
            .arg(&public)
            .arg("--verifier-key")
            .arg(&public),
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let o = output(
        common::kiln(home.path())
            .args(["sbom", &by_digest, "--key"])
            .arg(&public),
    );
    assert!(o.status.success(), "{}", text(&o));
    let printed: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(&printed, doc);
    let o = output(
        common::kiln(home.path())
            .args(["verify", &by_digest, "--key"])
            .arg(w("other.key.pub")),
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("does not meet --require"),
        "{}",
        text(&o)
    );

    // One byte of the SBOM envelope's signature changed in the registry: kiln verify and cosign
    // refuse it; the provenance still verifies.
    let sbom_layer = att["layers"]
        .as_array()
        .unwrap()
        .iter()
        .position(|l| l["annotations"]["predicateType"] == "https://spdx.dev/Document")
        .unwrap();
    let mut envelope: serde_json::Value =
        serde_json::from_slice(&std::fs::read(w(&format!("envelope-{sbom_layer}.json"))).unwrap())
            .unwrap();
    let sig = envelope["signatures"][0]["sig"]
        .as_str()
        .unwrap()
        .to_string();
    envelope["signatures"][0]["sig"] = common::change_base64_digit(&sig).into();
    let bytes = serde_json::to_vec(&envelope).unwrap();
    let digest = push_blob(&host, "kiln/app", &bytes, &w("blob"));
    let mut att2 = att.clone();
    att2["layers"][sbom_layer]["digest"] = digest.into();
    att2["layers"][sbom_layer]["size"] = bytes.len().into();
    let att_file = w("att.json");
    let att_url = format!("http://{host}/v2/kiln/app/manifests/sha256-{hex}.att");
    put_manifest(&att_url, &serde_json::to_vec(&att2).unwrap(), &att_file);
    let o = output(
        common::kiln(home.path())
            .args(["verify", &by_digest, "--json", "--key"])
            .arg(&public),
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let status = |what: &str| {
        report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["what"] == what)
            .unwrap()["status"]
            .clone()
    };
    assert_eq!(status("sbom"), "unverified", "{report}");
    assert_eq!(status("provenance"), "verified", "{report}");
    assert_eq!(status("signature"), "verified", "{report}");
    let o = cosign_attestations(&public, "spdxjson", &by_digest, &cosign_home);
    assert!(
        !o.status.success(),
        "cosign accepted a changed envelope: {}",
        text(&o)
    );

    // A truncated envelope, and one whose descriptor claims more than kiln reads (16 MiB):
    // refused with the reason, and the other checks stand.
    let original = std::fs::read(w(&format!("envelope-{sbom_layer}.json"))).unwrap();
    let truncated = &original[..original.len() / 2];
    let digest = push_blob(&host, "kiln/app", truncated, &w("blob"));
    let oversized = att["layers"][sbom_layer]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    for (digest, size, said) in [
        (digest.as_str(), truncated.len(), "EOF while parsing"),
        (oversized.as_str(), 17 << 20, "too large"),
    ] {
        let mut changed = att.clone();
        changed["layers"][sbom_layer]["digest"] = digest.into();
        changed["layers"][sbom_layer]["size"] = size.into();
        put_manifest(&att_url, &serde_json::to_vec(&changed).unwrap(), &att_file);
        let o = output(
            common::kiln(home.path())
                .args(["verify", &by_digest, "--json", "--key"])
                .arg(&public),
        );
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let sbom = report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["what"] == "sbom")
            .unwrap();
        assert_eq!(sbom["status"], "refused", "{report}");
        assert!(sbom["detail"].as_str().unwrap().contains(said), "{report}");
        let provenance = report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["what"] == "provenance")
            .unwrap();
        assert_eq!(provenance["status"], "verified", "{report}");
    }
}

/// PUT `manifest` (an OCI image manifest) at `url` (a registry's manifest URL), through `scratch`.
fn put_manifest(url: &str, manifest: &[u8], scratch: &Path) {
    std::fs::write(scratch, manifest).unwrap();
    curl(&[
        "-s",
        "-X",
        "PUT",
        "-H",
        "Content-Type: application/vnd.oci.image.manifest.v1+json",
        "--data-binary",
        &format!("@{}", scratch.display()),
        url,
    ]);
}

/// Upload `bytes` as a blob of `repo` (monolithic POST + PUT); its digest.
fn push_blob(host: &str, repo: &str, bytes: &[u8], scratch: &Path) -> String {
    std::fs::write(scratch, bytes).unwrap();
    let d = format!("sha256:{}", common::sha256_bytes(bytes));
    let loc = curl(&[
        "-X",
        "POST",
        "-o",
        "/dev/null",
        "-w",
        "%header{location}",
        &format!("http://{host}/v2/{repo}/blobs/uploads/"),
    ]);
    let loc = String::from_utf8(loc).unwrap();
    let loc = if loc.starts_with('/') {
        format!("http://{host}{loc}")
    } else {
        loc
    };
    let sep = if loc.contains('?') { '&' } else { '?' };
    curl(&[
        "-X",
        "PUT",
        "-H",
        "Content-Type: application/octet-stream",
        "--data-binary",
        &format!("@{}", scratch.display()),
        &format!("{loc}{sep}digest={d}"),
    ]);
    d
}
