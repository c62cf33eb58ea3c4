//! Image signatures in cosign's format, checked by cosign itself (`cosign verify --key`, the
//! Debian package from trixie that `.ci/setup` pins) against the Debian `docker-registry`:
//! - images signed with an ECDSA P-256 and an Ed25519 key from `kiln keygen --type` verify with
//!   cosign and with `kiln pull --trust`; another key, an unsigned image and a manifest changed
//!   after signing are refused by both;
//! - an image signed in kiln's old format is refused by `kiln pull --trust` with the way out
//!   (`kiln sign`), which then makes it verify with cosign; a second key's signature is added
//!   beside the first, and the same key and image give the same signature bytes.
//!
//! (Debian 12's skopeo is built with sigstore support disabled, so it cannot be the oracle.)

mod common;
use common::registry::start_registry;
use common::{curl, kiln_no_home as kiln, output};
use std::path::Path;
use std::process::{Command, Output};

const ACCEPT_OCI: &str = "Accept: application/vnd.oci.image.manifest.v1+json";

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `cosign verify --key PUB REF` with no transparency log, plain http to the loopback registry,
/// and no way out: any address but loopback would go to a proxy that is not there.
fn cosign_verify(public: &Path, reference: &str, home: &Path) -> Output {
    Command::new("cosign")
        .args([
            "verify",
            "--insecure-ignore-tlog",
            "--allow-http-registry",
            "--key",
        ])
        .arg(public)
        .arg(reference)
        .env("HOME", home)
        .env("TUF_ROOT", home.join("tuf"))
        .env("HTTPS_PROXY", "http://127.0.0.1:9")
        .env("HTTP_PROXY", "http://127.0.0.1:9")
        .env("NO_PROXY", "127.0.0.1")
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
    let sig_file = w("sig.json");
    std::fs::write(&sig_file, &sig).unwrap();
    curl(&[
        "-s",
        "-X",
        "PUT",
        "-H",
        "Content-Type: application/vnd.oci.image.manifest.v1+json",
        "--data-binary",
        &format!("@{}", sig_file.display()),
        &format!(
            "http://{host}/v2/kiln/moved/manifests/sha256-{}.sig",
            moved.trim_start_matches("sha256:")
        ),
    ]);
    let o = cosign_verify(&public("ecdsa"), &format!("{repo}:v1"), &cosign_home);
    assert!(
        !o.status.success(),
        "cosign accepted a moved tag: {}",
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
fn an_old_format_signature_is_named_and_kiln_sign_replaces_it() {
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
    let put_blob = |bytes: &[u8]| -> String {
        let file = w("blob");
        std::fs::write(&file, bytes).unwrap();
        let d = format!("sha256:{}", common::sha256_bytes(bytes));
        let loc = curl(&[
            "-s",
            "-X",
            "POST",
            "-o",
            "/dev/null",
            "-w",
            "%header{location}",
            &format!("http://{host}/v2/kiln/legacy/blobs/uploads/"),
        ]);
        let loc = String::from_utf8(loc).unwrap();
        let loc = if loc.starts_with('/') {
            format!("http://{host}{loc}")
        } else {
            loc
        };
        let sep = if loc.contains('?') { '&' } else { '?' };
        curl(&[
            "-s",
            "-X",
            "PUT",
            "-H",
            "Content-Type: application/octet-stream",
            "--data-binary",
            &format!("@{}", file.display()),
            &format!("{loc}{sep}digest={d}"),
        ]);
        d
    };
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
    std::fs::write(&old_file, serde_json::to_vec(&old).unwrap()).unwrap();
    curl(&[
        "-s",
        "-X",
        "PUT",
        "-H",
        "Content-Type: application/vnd.oci.image.manifest.v1+json",
        "--data-binary",
        &format!("@{}", old_file.display()),
        &format!("http://{host}/v2/kiln/legacy/manifests/sha256-{hex}.sig"),
    ]);

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
}
