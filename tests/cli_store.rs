//! The store commands end to end through the `kiln` binary on an OCI layout directory: keygen,
//! publish signed, images, pull with the right key, and refusal with the wrong one.

use std::process::Command;

mod common;
use common::{kiln_no_home as kiln, output};

#[test]
fn keygen_publish_images_pull() {
    let dir = tempfile::tempdir().unwrap();
    let d = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    let image = d("disk.qcow2");
    let made = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", &image, "64M"])
        .status()
        .unwrap();
    assert!(made.success());
    for key in ["a.key", "b.key"] {
        let o = output(kiln().args(["keygen", "-o", &d(key)]));
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    // keygen refuses to overwrite a key.
    assert!(
        !output(kiln().args(["keygen", "-o", &d("a.key")]))
            .status
            .success()
    );

    let layout = format!("oci:{}:v1", d("layout"));
    let o = output(kiln().args([
        "publish",
        &image,
        "--to",
        &layout,
        "--key",
        &d("a.key"),
        "--json",
    ]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["signature_digest"].is_string());

    let o = output(kiln().args(["images", &format!("oci:{}", d("layout")), "--json"]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(list[0]["tag"], "v1");
    assert_eq!(list[0]["signed"], true);

    let out = d("pulled.qcow2");
    let o = output(kiln().args(["pull", &layout, "-o", &out, "--trust", &d("a.key.pub")]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("signature verified"));
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&image).unwrap());

    let other = d("other.qcow2");
    let o = output(kiln().args(["pull", &layout, "-o", &other, "--trust", &d("b.key.pub")]));
    assert!(!o.status.success());
    assert!(!std::path::Path::new(&other).exists());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.to_lowercase().contains("key"), "{err}");
}
