//! Kernels built from `kernel-configs/` (`kernel.build`): Debian's linux-source package fetched and
//! verified by kiln, `kernel-configs/virt-minimal.config` merged onto tinyconfig, compiled, and
//! the image booted with no initramfs under OVMF + systemd-boot and by direct kernel boot; a rebuild
//! reuses the kernel; a fragment option that cannot be enabled is named in the error.
//!
//! The first run on a machine compiles the kernel (minutes); the build cache is shared between
//! runs (`/var/tmp/kiln-test-cache/kernel`), so reruns take seconds.

use std::path::PathBuf;
use std::process::Command;

mod common;
use common::{json_report as json, kiln, kiln_no_home, root};

fn stage<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stage"] == name)
        .unwrap_or_else(|| panic!("no {name} stage in {report}"))
}

/// A copy of the project (recipes, templates, kernel-configs, qemu) to change things in.
fn project_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for sub in ["recipes", "templates", "qemu", "kernel-configs"] {
        let ok = Command::new("cp")
            .arg("-r")
            .arg(root().join(sub))
            .arg(dir.path().join(sub))
            .status()
            .unwrap();
        assert!(ok.success());
    }
    dir
}

#[test]
fn built_kernel_boots_without_initramfs_both_ways_and_is_reused() {
    let home = common::shared_home();
    let out = tempfile::tempdir().unwrap();
    let report = json(
        &kiln(home.path())
            .args([
                "build",
                "recipes/minimal-custom-kernel.yaml",
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
    let kernel = &stage(&report, "kernel")["outputs"]["kernel"];
    // No initramfs: the kernel mounts root itself.
    assert!(kernel.get("initrd").is_none(), "{kernel}");
    let built = &kernel["built"];
    assert!(built["key"].as_str().unwrap().starts_with("sha256:"));
    let key_hex = built["key"].as_str().unwrap().trim_start_matches("sha256:");
    let build_dir = home.path().join("kernel/builds").join(key_hex);
    let config = std::fs::read_to_string(build_dir.join("config")).unwrap();
    for line in [
        "CONFIG_VIRTIO_BLK=y",
        "CONFIG_EXT4_FS=y",
        "CONFIG_EFI_STUB=y",
        "# CONFIG_MODULES is not set",
        "# CONFIG_BLK_DEV_INITRD is not set",
    ] {
        assert!(
            config.lines().any(|l| l == line),
            "{line} not in the config"
        );
    }
    assert!(build_dir.join("build.log").is_file());
    assert!(kernel["version"].as_str().unwrap().starts_with("6.1"));

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
        // The built kernel (its build timestamp from SOURCE_DATE_EPOCH), no initramfs, root
        // mounted by the kernel from root=PARTUUID=.
        assert!(
            text.contains("Tue Nov 14 22:13:20 UTC 2023"),
            "{log}: not the built kernel"
        );
        assert!(!text.contains("kiln-initramfs"), "{log}");
        assert!(
            text.contains("VFS: Mounted root (ext4 filesystem)"),
            "{log}"
        );
        assert!(text.contains("kiln: 6.1"), "{log}");
    }

    // The ESP has a boot entry without an initrd line, and no initrd file.
    let image = PathBuf::from(report["image"].as_str().unwrap());
    let raw = out.path().join("image.raw");
    let ok = Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(&image)
        .arg(&raw)
        .status()
        .unwrap();
    assert!(ok.success());
    let entries = Command::new("mdir")
        .args(["-/", "-b", "-i"])
        .arg(format!("{}@@1M", raw.display()))
        .arg("::")
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&entries.stdout);
    assert!(entries.status.success(), "{listing}");
    assert!(listing.to_lowercase().contains("vmlinuz"), "{listing}");
    assert!(!listing.to_lowercase().contains("initrd"), "{listing}");

    // From scratch (stage records gone): the kernel comes from the build cache, the image is the
    // same bytes.
    std::fs::remove_dir_all(home.path().join("stages")).unwrap();
    let started = std::time::Instant::now();
    let again = json(
        &kiln(home.path())
            .args([
                "build",
                "recipes/minimal-custom-kernel.yaml",
                "--json",
                "--no-verify",
                "-o",
            ])
            .arg(tempfile::tempdir().unwrap().path())
            .output()
            .unwrap(),
    );
    let kernel2 = &stage(&again, "kernel");
    assert_eq!(kernel2["cache"], "miss");
    assert_eq!(kernel2["outputs"]["kernel"]["built"]["cached"], true);
    assert_eq!(kernel2["outputs"]["kernel"]["vmlinuz"], kernel["vmlinuz"]);
    assert_eq!(again["image_digest"], report["image_digest"]);
    assert!(
        started.elapsed().as_secs() < 120,
        "a rebuild with the kernel cached took {:?}",
        started.elapsed()
    );
}

#[test]
fn an_option_that_cannot_be_enabled_is_named() {
    let home = common::shared_home();
    let project = project_copy();
    let base =
        std::fs::read_to_string(project.path().join("kernel-configs/virt-minimal.config")).unwrap();
    // USB mass storage needs USB and SCSI, which the fragment leaves off.
    std::fs::write(
        project.path().join("kernel-configs/broken.config"),
        format!("{base}\nCONFIG_USB_STORAGE=y\n"),
    )
    .unwrap();
    let recipe = std::fs::read_to_string(project.path().join("recipes/minimal-custom-kernel.yaml"))
        .unwrap()
        .replace("virt-minimal.config", "broken.config");
    std::fs::write(project.path().join("recipes/broken.yaml"), recipe).unwrap();
    let out = tempfile::tempdir().unwrap();
    let o = kiln(home.path())
        .current_dir(project.path())
        .args(["build", "recipes/broken.yaml", "--no-verify", "-o"])
        .arg(out.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("CONFIG_USB_STORAGE"), "{err}");
    assert!(err.contains("kernel-configs/broken.config"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);
}

#[test]
fn fragments_are_checked_when_the_recipe_loads() {
    let project = project_copy();
    let path = project.path().join("recipes/minimal-custom-kernel.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let cases = [
        ("kernel-configs/missing.config", "cannot read"),
        ("../outside.config", "leaves the project"),
        ("/etc/passwd", "leaves the project"),
    ];
    for (fragment, want) in cases {
        std::fs::write(
            project.path().join("recipes/f.yaml"),
            text.replace("kernel-configs/virt-minimal.config", fragment),
        )
        .unwrap();
        let o = kiln_no_home()
            .current_dir(project.path())
            .args(["check", "recipes/f.yaml"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{fragment}: {err}");
        assert!(err.contains(want), "{fragment}: {err}");
        assert!(err.contains(fragment), "{fragment}: {err}");
        // Located at the recipe line that names it.
        assert!(err.contains("recipes/f.yaml:"), "{fragment}: {err}");
    }
    // The real one is fine.
    let o = kiln_no_home()
        .current_dir(project.path())
        .args(["check", "recipes/minimal-custom-kernel.yaml"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}
