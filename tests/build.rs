//! `kiln build` end to end: the example recipe built from Debian packages fetched by kiln's own
//! client, booted under real QEMU through OVMF + systemd-boot and directly, rebuilt from cache,
//! rebuilt from scratch to the same bytes, and refused clearly when the input is bad.
//!
//! Package downloads are shared between runs (`/var/tmp/kiln-test-cache`); every test has its own
//! stage cache, so stages really run.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use common::{json_report as json, kiln, root, sha256, sha256_digest};

/// A fresh KILN_HOME whose downloads are shared with other runs.
fn home() -> tempfile::TempDir {
    common::shared_home()
}

/// The stages that record their results (source, render and publish run every time).
const RECORDED: [&str; 4] = ["rootfs", "kernel", "disk", "verify"];

/// (stage, cache) of every recorded stage in a report, and of every recorded step of it.
fn recorded(report: &serde_json::Value) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = common::stage_caches(report)
        .into_iter()
        .filter(|(s, _)| RECORDED.contains(&s.as_str()))
        .collect();
    for s in report["stages"].as_array().unwrap() {
        for step in s["steps"].as_array().into_iter().flatten() {
            out.push((
                format!(
                    "{}/{}",
                    s["stage"].as_str().unwrap(),
                    step["step"].as_str().unwrap()
                ),
                step["cache"].as_str().unwrap().to_string(),
            ));
        }
    }
    out
}

/// The SBOM `kiln build` writes beside the image: `kiln sbom IMAGE` prints it, the SPDX
/// project's validator accepts it, it lists the packages the report lists, and the files kiln
/// generated hash to what debugfs reads from the image's root. A changed image is refused.
fn sbom_beside_the_image(home: &Path, image: &Path, report: &serde_json::Value) {
    assert_eq!(
        report["sbom"].as_str().map(PathBuf::from),
        Some(PathBuf::from(format!("{}.spdx.json", image.display())))
    );
    let o = kiln(home).arg("sbom").arg(image).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let o = Command::new("/var/tmp/kiln-test-tools/bin/pyspdxtools")
        .arg("-i")
        .arg(report["sbom"].as_str().unwrap())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "pyspdxtools: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let mut listed: Vec<(String, String)> = doc["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["SPDXID"].as_str().unwrap().starts_with("SPDXRef-deb-"))
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                p["checksums"][0]["checksumValue"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            )
        })
        .collect();
    let mut expected: Vec<(String, String)> = report["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                p["sha256"].as_str().unwrap()["sha256:".len()..].to_string(),
            )
        })
        .collect();
    listed.sort();
    expected.sort();
    assert_eq!(listed, expected);
    // kiln's generated files, as the image holds them.
    let files = doc["files"].as_array().expect("generated files");
    let paths: Vec<&str> = files
        .iter()
        .map(|f| f["fileName"].as_str().unwrap().trim_start_matches('.'))
        .collect();
    assert!(paths.contains(&"/sbin/init"), "{paths:?}");
    assert!(paths.contains(&"/etc/fstab"), "{paths:?}");
    assert!(!paths.contains(&"/bin/busybox"), "{paths:?}");
    for (f, content) in files.iter().zip(common::root_files(image, &paths)) {
        let content = content.unwrap_or_else(|| panic!("debugfs found no {f}"));
        assert_eq!(
            f["checksums"][1]["checksumValue"],
            common::sha256_bytes(&content),
            "{f}"
        );
        assert_eq!(f["checksums"][0]["algorithm"], "SHA1", "{f}");
    }
    // Another image under the same name: refused, naming both digests.
    let other = image.with_extension("changed");
    std::fs::copy(image, &other).unwrap();
    std::fs::copy(
        report["sbom"].as_str().unwrap(),
        format!("{}.spdx.json", other.display()),
    )
    .unwrap();
    common::flip_byte(&other, 0);
    let o = kiln(home).arg("sbom").arg(&other).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("another build's SBOM"), "{err}");
}

#[test]
fn minimal_builds_boots_both_ways_and_rebuilds_from_cache() {
    let home = home();
    let out = tempfile::tempdir().unwrap();
    let report = json(
        &kiln(home.path())
            .args([
                "build",
                "recipes/minimal.yaml",
                "--json",
                "--profile",
                "uefi",
                "--profile",
                "direct",
                "-o",
            ])
            .arg(out.path())
            .output()
            .unwrap(),
    );
    let inputs = report["inputs"].as_str().unwrap();
    let boots = report["boots"].as_array().unwrap();
    assert_eq!(boots.len(), 2);
    for (boot, profile) in boots.iter().zip(["uefi", "direct"]) {
        assert_eq!(boot["profile"], profile);
        let marker = boot["marker_line"].as_str().unwrap();
        assert!(
            marker.contains(&format!("kiln-boot-ok {inputs}")),
            "{marker}"
        );
        let log = boot["serial_log"].as_str().unwrap();
        let text = std::fs::read_to_string(log).unwrap();
        // kiln's initramfs found the root partition and handed over to the image's init.
        assert!(text.contains("kiln-initramfs: root PARTUUID="), "{log}");
        assert!(text.contains("kiln: 6.1"), "{log}");
    }
    // UEFI went through OVMF's boot manager (which started systemd-boot from the ESP).
    let uefi_log = std::fs::read_to_string(boots[0]["serial_log"].as_str().unwrap()).unwrap();
    assert!(uefi_log.contains("BdsDxe"), "{uefi_log}");
    let image = PathBuf::from(report["image"].as_str().unwrap());
    assert_eq!(image.file_name().unwrap(), "minimal-1.0.0.qcow2");
    let check = Command::new("qemu-img")
        .arg("check")
        .arg(&image)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    let mut report_file = image.as_os_str().to_os_string();
    report_file.push(".report.json");
    assert!(Path::new(&report_file).is_file());
    sbom_beside_the_image(home.path(), &image, &report);
    assert!(
        common::stage_caches(&report)
            .iter()
            .any(|(s, c)| s == "disk" && c == "miss")
    );

    // Unchanged rebuild: all cache hits, no download, no boot.
    let again = json(
        &kiln(home.path())
            .args([
                "build",
                "recipes/minimal.yaml",
                "--json",
                "--profile",
                "uefi",
                "--profile",
                "direct",
                "-o",
            ])
            .arg(out.path())
            .output()
            .unwrap(),
    );
    assert!(
        recorded(&again).iter().all(|(_, c)| c == "hit"),
        "{:?}",
        recorded(&again)
    );
    assert_eq!(again["mirror_requests"], 0);
    assert_eq!(again["image_digest"], report["image_digest"]);

    // From scratch (stage records gone, downloads kept): the same bytes.
    std::fs::remove_dir_all(home.path().join("stages")).unwrap();
    let out2 = tempfile::tempdir().unwrap();
    let fresh = json(
        &kiln(home.path())
            .args([
                "build",
                "recipes/minimal.yaml",
                "--json",
                "--no-verify",
                "-o",
            ])
            .arg(out2.path())
            .output()
            .unwrap(),
    );
    assert!(
        common::stage_caches(&fresh)
            .iter()
            .all(|(_, c)| c == "miss"),
        "{:?}",
        common::stage_caches(&fresh)
    );
    // Every stage, in the order of the bus, in process as on the bus.
    let plan: Vec<String> = common::stage_caches(&fresh)
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(
        plan,
        [
            "source", "render", "rootfs", "kernel", "disk", "verify", "publish"
        ]
    );
    assert_eq!(fresh["image_digest"], report["image_digest"]);
    assert_eq!(
        sha256(&image),
        sha256(&out2.path().join("minimal-1.0.0.qcow2"))
    );
    assert_eq!(
        sha256_digest(&image),
        report["image_digest"].as_str().unwrap()
    );
}

/// A project copy with a recipe that extends minimal.yaml with `extra`.
fn variant(extra: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for sub in ["recipes", "templates", "qemu"] {
        let ok = Command::new("cp")
            .arg("-r")
            .arg(root().join(sub))
            .arg(dir.path().join(sub))
            .status()
            .unwrap();
        assert!(ok.success());
    }
    std::fs::write(
        dir.path().join("recipes/variant.yaml"),
        format!("extends: minimal.yaml\nname: variant\n{extra}"),
    )
    .unwrap();
    dir
}

fn fails(home: &Path, project: &Path, args: &[&str]) -> (Option<i32>, String) {
    let out = tempfile::tempdir().unwrap();
    let o = kiln(home)
        .current_dir(project)
        .args(["build", "recipes/variant.yaml", "-o"])
        .arg(out.path())
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "should fail: {err}");
    assert!(!err.contains("panicked"), "{err}");
    // No image in the output directory (at most the serial log of a failed boot).
    let left: Vec<String> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".serial.log"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    (o.status.code(), err)
}

#[test]
fn bad_input_is_refused_clearly() {
    let home = home();
    // An unknown package: named, with the suite.
    let p = variant("kernel:\n  package: linux-image-cloud-amd65\n");
    let (code, err) = fails(home.path(), p.path(), &["--no-verify"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("linux-image-cloud-amd65"), "{err}");
    assert!(err.contains("bookworm"), "{err}");

    // A kernel module that does not exist.
    let p = variant("initramfs:\n  modules: [virtio_blkk]\n");
    let (code, err) = fails(home.path(), p.path(), &["--no-verify"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("virtio_blkk"), "{err}");
    assert!(err.contains("did you mean `virtio_blk`"), "{err}");

    // An image that does not boot: its init is missing, the kernel panics; the error shows the
    // end of the serial log.
    let p =
        variant("boot:\n  cmdline: \"console=ttyS0 init=/sbin/missing\"\nverify:\n  timeout: 60\n");
    let (code, err) = fails(home.path(), p.path(), &["--profile", "direct"]);
    assert_ne!(code, Some(0));
    assert!(
        err.to_lowercase().contains("serial") || err.contains("panic"),
        "{err}"
    );
    assert!(
        err.lines().count() > 10,
        "expected the serial log's last lines:\n{err}"
    );
}

#[test]
fn a_mirror_that_does_not_answer_is_a_clear_error() {
    let home = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let o = kiln(home.path())
        .env("KILN_DEBIAN_MIRROR", "http://127.0.0.1:9/debian")
        .args(["build", "recipes/minimal.yaml", "--no-verify", "-o"])
        .arg(out.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("127.0.0.1:9"), "{err}");
    assert!(err.contains("did not answer"), "{err}");
    assert!(started.elapsed().as_secs() < 60);
    // Nothing was cached for it.
    assert!(!home.path().join("stages").exists());
}
