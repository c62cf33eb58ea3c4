//! The boot chain that proves itself (recipes/minimal-secure.yaml): a unified kernel image and
//! systemd-boot signed for UEFI Secure Boot by kiln itself, the keys enrolled by systemd-boot in
//! a fresh OVMF (setup mode), and the boot under Secure Boot enforcing. Checked with tools that
//! are not kiln: `sbverify --cert` (sbsigntool) on both binaries, `objdump -h` on the UKI's
//! sections, `openssl x509` on the certificate, OVMF itself (the kernel says "Secure boot
//! enabled"), and images that must not boot — a UKI signed with another key (`sbsign`), one
//! without a signature (`sbattach --remove`) and one whose `.cmdline` changed after signing: the
//! firmware refuses each and kiln reports it in the console's words. The root is mounted through
//! dm-verity: `veritysetup verify` accepts the root and hash partitions with the root hash from
//! the UKI's command line, and one byte changed in a file the boot reads fails the boot with
//! dm-verity's error, while the same change in an image without verity boots.

mod common;
use common::{extract_partition, kiln, output, run};
use std::path::{Path, PathBuf};
use std::process::Command;

const RECIPE: &str = "recipes/minimal-secure.yaml";

fn text(o: &std::process::Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `kiln build RECIPE --profile PROFILE... --json -o OUT` in `home`: the report.
fn build(home: &Path, out: &Path, profiles: &[&str]) -> serde_json::Value {
    build_recipe(home, RECIPE, out, profiles)
}

fn build_recipe(home: &Path, recipe: &str, out: &Path, profiles: &[&str]) -> serde_json::Value {
    let mut c = kiln(home);
    c.args(["build", recipe, "--json"]);
    for p in profiles {
        c.args(["--profile", p]);
    }
    let o = output(c.arg("-o").arg(out));
    assert!(o.status.success(), "{}", text(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// The image as a raw disk, and its ESP (partition 1) as a file system image.
fn raw_and_esp(image: &Path, dir: &Path) -> (PathBuf, PathBuf) {
    let raw = dir.join("disk.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(image)
        .arg(&raw));
    let esp = dir.join("esp.img");
    extract_partition(&raw, 1, &esp);
    (raw, esp)
}

fn mcopy_out(esp: &Path, from: &str, to: &Path) {
    run(Command::new("mcopy")
        .args(["-o", "-i"])
        .arg(esp)
        .arg(format!("::{from}"))
        .arg(to));
}

/// A copy of `raw` whose ESP holds `uki` as the unified kernel image.
fn with_uki(raw: &Path, esp: &Path, uki: &Path, name: &str, dir: &Path) -> PathBuf {
    let esp_copy = dir.join(format!("{name}.esp"));
    std::fs::copy(esp, &esp_copy).unwrap();
    run(Command::new("mcopy")
        .args(["-o", "-i"])
        .arg(&esp_copy)
        .arg(uki)
        .arg("::EFI/Linux/minimal-secure.efi"));
    let disk = dir.join(format!("{name}.raw"));
    std::fs::copy(raw, &disk).unwrap();
    // The ESP starts at sector 2048 (sfdisk's table, as extract_partition read it).
    let json = run(Command::new("sfdisk").arg("--json").arg(&disk));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let start = v["partitiontable"]["partitions"][0]["start"]
        .as_u64()
        .unwrap();
    run(Command::new("dd")
        .arg(format!("if={}", esp_copy.display()))
        .arg(format!("of={}", disk.display()))
        .args(["bs=512", "conv=notrunc,sparse", "status=none"])
        .arg(format!("seek={start}")));
    disk
}

/// A copy of `raw` (to `dest`) with one byte of `file`'s content changed in partition `n`,
/// whose extracted copy `part` debugfs reads the file's first block from.
fn changed_file(raw: &Path, part: &Path, n: usize, file: &str, dest: &Path) -> PathBuf {
    let blocks = run(Command::new("debugfs")
        .arg("-R")
        .arg(format!("blocks {file}"))
        .arg(part));
    let block: u64 = blocks.split_whitespace().next().unwrap().parse().unwrap();
    let json = run(Command::new("sfdisk").arg("--json").arg(raw));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let start = v["partitiontable"]["partitions"][n - 1]["start"]
        .as_u64()
        .unwrap();
    std::fs::copy(raw, dest).unwrap();
    common::flip_byte(dest, start * 512 + block * 4096);
    dest.to_path_buf()
}

/// `kiln boot DISK --profile uefi-secureboot`: must fail with the firmware's refusal.
fn refused(home: &Path, disk: &Path, marker: &str) -> String {
    let o = output(kiln(home).arg("boot").arg(disk).args([
        "--profile",
        "uefi-secureboot",
        "--timeout",
        "120",
        "--expect",
        marker,
    ]));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        err.contains("the firmware refused to start the image"),
        "{err}"
    );
    assert!(
        err.contains("Access Denied") || err.contains("Security Violation"),
        "{err}"
    );
    err
}

#[test]
fn a_signed_uki_boots_under_secure_boot_and_nothing_else_does() {
    let home = common::shared_home();
    let work = tempfile::tempdir().unwrap();
    let w = |n: &str| work.path().join(n);
    // The project's key, where the build looks for it ($KILN_HOME/secureboot.key).
    let o = output(
        kiln(home.path())
            .args([
                "keygen",
                "--secure-boot",
                "--name",
                "kiln test Secure Boot key",
                "-o",
            ])
            .arg(home.path().join("secureboot.key")),
    );
    assert!(o.status.success(), "{}", text(&o));
    run(Command::new("openssl")
        .args(["pkey", "-noout", "-in"])
        .arg(home.path().join("secureboot.key")));
    let report = build(home.path(), &w("out"), &["uefi-secureboot", "direct"]);
    let boots = report["boots"].as_array().unwrap();
    // Secure Boot enforcing with kiln's keys, enrolled by systemd-boot on the first boot.
    assert_eq!(boots[0]["profile"], "uefi-secureboot");
    assert_eq!(boots[0]["secure_boot"], "Secure boot enabled", "{report}");
    let log = std::fs::read_to_string(boots[0]["serial_log"].as_str().unwrap()).unwrap();
    assert!(
        log.contains("Enrolling secure boot keys from directory"),
        "{log}"
    );
    // Direct boot takes the kernel and initramfs from the build, as before.
    assert_eq!(boots[1]["profile"], "direct");
    // Both mounted the root through dm-verity, with the root hash the build reports.
    let root_hash = boots[0]["verity_root_hash"].as_str().unwrap().to_string();
    assert_eq!(root_hash.len(), 64, "{report}");
    assert_eq!(boots[1]["verity_root_hash"], root_hash.as_str());
    let marker = boots[0]["marker_line"].as_str().unwrap().to_string();

    // The oracles: sbverify with kiln's certificate (and not another), objdump, openssl.
    let cert = home.path().join("secureboot.key.crt");
    let x509 = run(Command::new("openssl")
        .args(["x509", "-noout", "-subject", "-in"])
        .arg(&cert));
    assert!(x509.contains("kiln test Secure Boot key"), "{x509}");
    let image = PathBuf::from(report["image"].as_str().unwrap());
    let (raw, esp) = raw_and_esp(&image, work.path());
    let uki = w("uki.efi");
    let loader = w("BOOTX64.EFI");
    mcopy_out(&esp, "EFI/Linux/minimal-secure.efi", &uki);
    mcopy_out(&esp, "EFI/BOOT/BOOTX64.EFI", &loader);
    for auth in ["PK", "KEK", "db"] {
        mcopy_out(&esp, &format!("loader/keys/auto/{auth}.auth"), &w(auth));
    }
    run(Command::new("openssl").args([
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=another key",
        "-days",
        "1",
        "-keyout",
        w("other.key").to_str().unwrap(),
        "-out",
        w("other.crt").to_str().unwrap(),
    ]));
    for binary in [&uki, &loader] {
        let o = output(
            Command::new("sbverify")
                .arg("--cert")
                .arg(&cert)
                .arg(binary),
        );
        assert!(
            o.status.success(),
            "sbverify {}: {}",
            binary.display(),
            text(&o)
        );
        let o = output(
            Command::new("sbverify")
                .arg("--cert")
                .arg(w("other.crt"))
                .arg(binary),
        );
        assert!(!o.status.success(), "sbverify accepted another certificate");
    }
    let sections = run(Command::new("objdump").arg("-h").arg(&uki));
    let names: Vec<&str> = sections
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|n| n.starts_with('.'))
        .collect();
    for s in [".osrel", ".cmdline", ".uname", ".initrd", ".linux"] {
        assert!(names.contains(&s), "{s} not in {names:?}");
    }
    let at = names.iter().position(|n| *n == ".linux").unwrap();
    assert_eq!(
        at,
        names.len() - 1,
        "the kernel is the last section: {names:?}"
    );
    // The root hash on the UKI's command line (objcopy reads the section) is what veritysetup
    // verifies the root and hash partitions with.
    let cmdline_file = w("cmdline");
    run(Command::new("objcopy")
        .arg(format!(
            "--dump-section=.cmdline={}",
            cmdline_file.display()
        ))
        .arg(&uki)
        .arg(w("uki-copy.efi")));
    let cmdline = std::fs::read_to_string(&cmdline_file).unwrap();
    assert!(
        cmdline.contains(&format!("roothash={root_hash}")),
        "{cmdline}"
    );
    let (p2, p3) = (w("p2.img"), w("p3.img"));
    extract_partition(&raw, 2, &p2);
    extract_partition(&raw, 3, &p3);
    let o = output(
        Command::new("veritysetup")
            .arg("verify")
            .arg(&p2)
            .arg(&p3)
            .arg(&root_hash),
    );
    assert!(o.status.success(), "veritysetup verify: {}", text(&o));
    // No Type #1 entry: systemd-boot finds the UKI itself.
    let listing = run(Command::new("mdir")
        .args(["-/", "-b", "-i"])
        .arg(&esp)
        .arg("::"));
    assert!(!listing.contains("loader/entries/"), "{listing}");

    // Unsigned (sbattach removes kiln's signature).
    let unsigned = w("unsigned.efi");
    std::fs::copy(&uki, &unsigned).unwrap();
    run(Command::new("sbattach").arg("--remove").arg(&unsigned));
    let disk = with_uki(&raw, &esp, &unsigned, "unsigned", work.path());
    refused(home.path(), &disk, &marker);
    // Signed with another key only: refused.
    let other = w("other.efi");
    run(Command::new("sbsign")
        .arg("--key")
        .arg(w("other.key"))
        .arg("--cert")
        .arg(w("other.crt"))
        .arg("--output")
        .arg(&other)
        .arg(&unsigned));
    let disk = with_uki(&raw, &esp, &other, "other", work.path());
    refused(home.path(), &disk, &marker);
    // The command line changed after signing (one byte of `.cmdline`): refused.
    let mut bytes = std::fs::read(&uki).unwrap();
    let line = sections
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(".cmdline"))
        .unwrap();
    let offset = u64::from_str_radix(line.split_whitespace().nth(5).unwrap(), 16).unwrap();
    bytes[offset as usize] ^= 0x01;
    let changed = w("changed.efi");
    std::fs::write(&changed, &bytes).unwrap();
    let disk = with_uki(&raw, &esp, &changed, "changed", work.path());
    refused(home.path(), &disk, &marker);

    // Under firmware without Secure Boot that ends the boot at a reset, the enrollment's reset
    // is said as such, with the profile to use.
    let o = output(kiln(home.path()).arg("boot").arg(&raw).args([
        "--profile",
        "uefi",
        "--timeout",
        "120",
        "--expect",
        &marker,
    ]));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("enrolled its Secure Boot keys and reset the machine")
            && err.contains("uefi-secureboot"),
        "{err}"
    );

    // systemd pairs the root with its verity partition from the root hash alone.
    if Path::new("/usr/bin/systemd-dissect").exists() && common::is_root() {
        let json = run(Command::new("systemd-dissect")
            .args(["--json=short", &format!("--root-hash={root_hash}")])
            .arg(&raw));
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        let verity = v["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["designator"] == "root" && m["verity"] == "yes");
        assert!(verity, "{json}");
    }

    // One byte of /etc/hostname (read at every boot) changed in the root: dm-verity refuses it.
    let changed_root = changed_file(&raw, &p2, 2, "/etc/hostname", &w("changed-root.raw"));
    let o = output(kiln(home.path()).arg("boot").arg(&changed_root).args([
        "--profile",
        "uefi-secureboot",
        "--timeout",
        "120",
        "--expect",
        &marker,
    ]));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("dm-verity refused a block of the root (/dev/mapper/root)"),
        "{err}"
    );
    assert!(
        err.contains("device-mapper: verity: 254:") && err.contains("is corrupted"),
        "{err}"
    );
    // The same change in an image without dm-verity boots.
    let plain = build_recipe(
        home.path(),
        "recipes/minimal.yaml",
        &w("plain"),
        &["direct"],
    );
    let plain_image = PathBuf::from(plain["image"].as_str().unwrap());
    let plain_dir = w("plain-work");
    std::fs::create_dir(&plain_dir).unwrap();
    let (plain_raw, _) = raw_and_esp(&plain_image, &plain_dir);
    let plain_root = plain_dir.join("p2.img");
    extract_partition(&plain_raw, 2, &plain_root);
    let changed_plain = changed_file(
        &plain_raw,
        &plain_root,
        2,
        "/etc/hostname",
        &w("changed-plain.raw"),
    );
    let plain_marker = plain["boots"][0]["marker_line"].as_str().unwrap();
    let o = output(kiln(home.path()).arg("boot").arg(&changed_plain).args([
        "--profile",
        "uefi",
        "--timeout",
        "120",
        "--expect",
        plain_marker,
    ]));
    assert!(o.status.success(), "{}", text(&o));

    // Same inputs and the same key in another cache: the same bytes.
    let again = common::shared_home();
    for f in ["secureboot.key", "secureboot.key.crt"] {
        std::fs::copy(home.path().join(f), again.path().join(f)).unwrap();
    }
    let second = build(again.path(), &w("out2"), &["direct"]);
    assert_eq!(second["image_digest"], report["image_digest"]);
}
