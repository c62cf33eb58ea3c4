//! Boot verification with real QEMU, a real Debian cloud kernel, busybox and systemd-boot: a
//! direct kernel boot, its failure modes (timeout, QEMU exit, kernel panic), a UEFI boot of a GPT
//! disk made with sfdisk/mkfs.vfat/mcopy from the ESP Tree that `kiln::boot` makes, the same from
//! a disk kiln's own layout/GPT/FAT32 writers made, and the KVM probe checked against what a
//! forced KVM boot really does. Boots run one at a time.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::verify_support::*;
use common::{run, sha256};
use kiln::boot::{self, BootEntry, LoaderOptions};
use kiln::tree::Content;
use kiln::verify::{
    self, Accel, BootImageOptions, BootMethod, BootSpec, ProfileDir, VerifyError, accel,
};

fn profile(name: &str) -> kiln::verify::Profile {
    ProfileDir::locate(None).unwrap().load(name).unwrap()
}

fn direct_spec(dir: &Path, expect: &str, timeout: Duration, rdinit: &str) -> BootSpec {
    let (_, vmlinuz, _) = cloud_kernel();
    let initrd = initramfs(dir);
    let mut spec = BootSpec::new(profile("direct"), expect, timeout, dir.join("serial.log"));
    spec.kernel = Some(vmlinuz);
    spec.initrd = Some(initrd);
    spec.cmdline = format!("rdinit={rdinit}");
    spec
}

fn log_text(path: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(path).unwrap()).into_owned()
}

/// The last `n` non-empty lines of the serial log, cleaned as the watcher cleans them.
fn last_log_lines(path: &Path, n: usize) -> Vec<String> {
    let text = log_text(path);
    let lines: Vec<String> = text
        .lines()
        .map(|l| l.chars().filter(|c| !c.is_control()).collect::<String>())
        .filter(|l| !l.trim().is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..].to_vec()
}

#[test]
fn direct_boot_reaches_the_marker() {
    let _one = qemu_lock();
    let dir = tempfile::tempdir().unwrap();
    let mut spec = direct_spec(dir.path(), MARKER, Duration::from_secs(120), "/init");
    // A qcow2 disk: the guest must see its virtual size (64 MiB = 131072 sectors), which it only
    // does if kiln detected the format.
    let disk = dir.path().join("disk.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&disk)
        .arg("64M"));
    let before = sha256(&disk);
    spec.image = Some(disk.clone());

    let report = verify::boot(&spec).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{report}\n  accel: {}", report.accel_detail);

    let log = log_text(&spec.serial_log);
    assert!(log.contains(MARKER), "serial log lacks the marker");
    assert!(
        log.contains("Linux version"),
        "serial log lacks the kernel banner"
    );
    assert!(
        log.contains("kiln-test: vda sectors=131072"),
        "guest did not see the qcow2 disk:\n{log}"
    );
    assert!(report.marker_line.contains(MARKER));
    let kernel = report.time_to_kernel.expect("kernel banner time");
    let first = report.time_to_first_line.expect("first line time");
    assert!(
        first <= kernel && kernel < report.time_to_marker,
        "{report:?}"
    );
    assert!(report.time_to_marker <= report.total);
    assert!(
        report.powered_off,
        "init ran poweroff -f, so QEMU should have exited by itself"
    );
    assert_eq!(
        report.accel,
        accel::probe_cached(&verify::qemu::find_qemu().unwrap()).accel
    );
    assert_eq!(
        sha256(&disk),
        before,
        "the boot changed the image (snapshot=on missing?)"
    );
    assert_gone(report.qemu_pid);
}

#[test]
fn direct_boot_times_out_with_the_console_tail() {
    let _one = qemu_lock();
    let dir = tempfile::tempdir().unwrap();
    let timeout = Duration::from_secs(8);
    let spec = direct_spec(dir.path(), "THIS-LINE-NEVER-COMES", timeout, "/hang");
    // Probe first (cached), so that only the boot is timed.
    accel::probe_cached(&verify::qemu::find_qemu().unwrap());
    let start = Instant::now();
    let err = verify::boot(&spec).expect_err("the marker never comes");
    let took = start.elapsed();
    eprintln!("failed after {took:?} as expected:\n{err}");
    let VerifyError::Timeout {
        pid, ref console, ..
    } = err
    else {
        panic!("expected a timeout, got: {err}");
    };
    assert!(
        took >= timeout && took < timeout + Duration::from_secs(4),
        "took {took:?} for a {timeout:?} timeout"
    );
    let message = err.to_string();
    assert!(
        message.contains("last 40 lines of the serial console"),
        "{message}"
    );
    assert!(message.contains(&spec.serial_log.display().to_string()));
    // The message holds the log's last lines, the newest last.
    let expected = last_log_lines(&spec.serial_log, 5);
    assert!(
        !expected.is_empty(),
        "the guest printed nothing in {timeout:?}"
    );
    let tail_lines: Vec<&str> = console
        .tail
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert!(tail_lines.len() <= 40);
    assert_eq!(
        tail_lines[tail_lines.len() - expected.len()..],
        expected.iter().map(String::as_str).collect::<Vec<_>>()[..]
    );
    assert_gone(pid);
}

#[test]
fn direct_boot_reports_qemu_exiting_first() {
    let _one = qemu_lock();
    let dir = tempfile::tempdir().unwrap();
    let spec = direct_spec(dir.path(), MARKER, Duration::from_secs(120), "/quit");
    let start = Instant::now();
    let err = verify::boot(&spec).expect_err("the guest powers off without the marker");
    eprintln!("failed after {:?} as expected:\n{err}", start.elapsed());
    let VerifyError::Exited {
        status, console, ..
    } = &err
    else {
        panic!("expected QEMU to exit first, got: {err}");
    };
    assert!(status.contains("exit status: 0"), "{status}");
    assert!(
        console.tail.contains("kiln-test: quitting"),
        "{}",
        console.tail
    );
    assert_eq!(qemu_children(), Vec::<u32>::new());
}

#[test]
fn direct_boot_fails_fast_on_a_kernel_panic() {
    let _one = qemu_lock();
    let dir = tempfile::tempdir().unwrap();
    // No such init and no root disk: the kernel panics. Without the profile's panic=-1 a
    // panicked kernel waits forever, so only the panic line can end this boot before the timeout.
    let mut spec = direct_spec(
        dir.path(),
        MARKER,
        Duration::from_secs(120),
        "/no-such-init",
    );
    spec.profile.append = "console=ttyS0,115200".into();
    let start = Instant::now();
    let err = verify::boot(&spec).expect_err("the kernel panics");
    let took = start.elapsed();
    eprintln!("failed after {took:?} as expected:\n{err}");
    let VerifyError::Panic { line, console, .. } = &err else {
        panic!("expected a kernel panic error, got: {err}");
    };
    assert!(line.contains("Kernel panic - not syncing"), "{line}");
    assert!(console.tail.contains("Kernel panic"), "{}", console.tail);
    assert!(took < Duration::from_secs(60), "took {took:?}");
    assert_eq!(qemu_children(), Vec::<u32>::new());
}

/// A GPT disk with an ESP (FAT32, made by mkfs.vfat at an offset, filled by mcopy from the Tree
/// `kiln::boot::esp_tree` made) and an empty root partition whose PARTUUID the entry names.
fn uefi_disk(dir: &Path, root_uuid: &uuid::Uuid) -> PathBuf {
    let (_, vmlinuz, release) = cloud_kernel();
    let initrd = initramfs(dir);
    let content = |p: &Path| Content::Host {
        path: p.to_path_buf(),
        len: std::fs::metadata(p).unwrap().len(),
    };
    let package = kiln::tree::Tree::from_host_dir(&systemd_boot_root()).unwrap();
    let sdboot = boot::systemd_boot_from(&package).unwrap();
    let entry = BootEntry {
        name: "kiln".into(),
        title: "kiln test image".into(),
        version: Some(release),
        kernel: content(&vmlinuz),
        initrd: Some(content(&initrd)),
        cmdline: "console=ttyS0,115200 panic=-1".into(),
        root_partuuid: Some(*root_uuid),
    };
    let esp = boot::esp_tree(&sdboot, &[entry], &LoaderOptions::new(1_700_000_000)).unwrap();
    let esp_dir = dir.join("esp");
    std::fs::create_dir(&esp_dir).unwrap();
    write_tree(&esp, &esp_dir);

    let disk = dir.join("disk.raw");
    // 1 MiB gap, 64 MiB ESP, 8 MiB root, GPT backup at the end.
    let esp_sectors = 64 * 2048;
    let root_start = 2048 + esp_sectors;
    std::fs::File::create(&disk)
        .unwrap()
        .set_len((root_start + 8 * 2048 + 2048) * 512)
        .unwrap();
    let script = format!(
        "label: gpt\nunit: sectors\n\
         start=2048, size={esp_sectors}, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=esp\n\
         start={root_start}, size={}, type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, uuid={root_uuid}, name=root\n",
        8 * 2048
    );
    let mut sfdisk = Command::new("sfdisk")
        .args(["--quiet", "--no-reread", "--no-tell-kernel"])
        .arg(&disk)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    sfdisk
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(sfdisk.wait().unwrap().success(), "sfdisk failed");
    run(Command::new("mkfs.vfat")
        .args(["-F", "32", "-n", "ESP", "--offset", "2048"])
        .arg(&disk)
        .arg((esp_sectors / 2).to_string()));
    let mut mcopy = Command::new("mcopy");
    mcopy
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-s")
        .arg("-i")
        .arg(format!("{}@@1M", disk.display()));
    for (path, _) in esp.children(&kiln::tree::TreePath::root()) {
        mcopy.arg(esp_dir.join(path.as_str()));
    }
    run(mcopy.arg("::/"));
    let listing = run(Command::new("mdir")
        .env("MTOOLS_SKIP_CHECK", "1")
        .args(["-/", "-b", "-i"])
        .arg(format!("{}@@1M", disk.display()))
        .arg("::/"));
    assert!(listing.contains("BOOTX64.EFI"), "{listing}");
    assert!(listing.contains("entries/kiln.conf"), "{listing}");
    disk
}

#[test]
fn uefi_boot_through_systemd_boot() {
    let _one = qemu_lock();
    let dir = tempfile::tempdir().unwrap();
    let root_uuid = uuid::Uuid::from_bytes(kiln::disk::derive_id("verify-test", "root"));
    let disk = uefi_disk(dir.path(), &root_uuid);
    let uefi = profile("uefi");
    assert_eq!(uefi.boot, BootMethod::Uefi);
    let shared_vars = uefi.firmware.as_ref().unwrap().vars.clone();
    let vars_before = sha256(&shared_vars);
    let disk_before = sha256(&disk);

    let mut opts = BootImageOptions::new("uefi", MARKER, Duration::from_secs(240));
    opts.serial_log = None; // beside the image
    let report = verify::boot_image(&disk, &opts).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{report}\n  accel: {}", report.accel_detail);

    assert_eq!(report.serial_log, verify::serial_log_path(&disk));
    let log = log_text(&report.serial_log);
    assert!(
        log.contains("BdsDxe"),
        "OVMF did not report booting the disk:\n{log}"
    );
    // systemd-boot started the kernel with the entry's options.
    let options = format!("root=PARTUUID={root_uuid}");
    assert!(
        log.lines()
            .any(|l| l.contains("Kernel command line:") && l.contains(&options)),
        "the kernel command line lacks {options}:\n{log}"
    );
    let sectors = std::fs::metadata(&disk).unwrap().len() / 512;
    assert!(
        log.contains(&format!("kiln-test: vda sectors={sectors}")),
        "guest did not see the disk:\n{log}"
    );
    let kernel = report.time_to_kernel.expect("kernel banner time");
    let first = report.time_to_first_output.expect("firmware output time");
    assert!(
        first < kernel && kernel < report.time_to_marker,
        "{report:?}"
    );
    assert!(report.powered_off);
    assert_eq!(
        sha256(&shared_vars),
        vars_before,
        "the shared OVMF_VARS file was written"
    );
    assert_eq!(sha256(&disk), disk_before, "the boot changed the image");
    assert_gone(report.qemu_pid);
}

/// The same UEFI boot from a disk that kiln wrote itself: layout plan, GPT and FAT32 writers.
#[test]
fn uefi_boot_of_a_disk_kiln_wrote() {
    use kiln::disk::fat::{FatOptions, fat32_min_size, write_fat32};
    use kiln::disk::gpt::PartitionKind;
    use kiln::disk::layout::{Filesystem, PartitionSpec, Size, plan};
    use kiln::disk::{Region, WriteAt};

    let _one = qemu_lock();
    let dir = tempfile::tempdir().unwrap();
    let (_, vmlinuz, release) = cloud_kernel();
    let initrd = initramfs(dir.path());
    let content = |p: &Path| Content::Host {
        path: p.to_path_buf(),
        len: std::fs::metadata(p).unwrap().len(),
    };
    let seed = "verify-kiln-disk";
    let epoch = 1_700_000_000;
    // The root partition's GUID is known before the ESP is written: the layout derives it.
    let parts = |esp_size: u64| {
        vec![
            PartitionSpec {
                name: "esp".into(),
                kind: PartitionKind::Esp,
                filesystem: Filesystem::Fat32,
                size: Size::Bytes(esp_size),
                min_size: esp_size,
            },
            PartitionSpec {
                name: "root".into(),
                kind: PartitionKind::RootX86_64,
                filesystem: Filesystem::None,
                size: Size::Bytes(8 << 20),
                min_size: 0,
            },
        ]
    };
    let make_esp = |root: uuid::Uuid| {
        let package = kiln::tree::Tree::from_host_dir(&systemd_boot_root()).unwrap();
        let entry = BootEntry {
            name: "kiln".into(),
            title: "kiln test image".into(),
            version: Some(release.clone()),
            kernel: content(&vmlinuz),
            initrd: Some(content(&initrd)),
            cmdline: "console=ttyS0,115200 panic=-1".into(),
            root_partuuid: Some(root),
        };
        let sdboot = boot::systemd_boot_from(&package).unwrap();
        boot::esp_tree(&sdboot, &[entry], &LoaderOptions::new(epoch)).unwrap()
    };
    let probe_layout = plan(Size::Auto, &parts(64 << 20), seed).unwrap();
    let root_uuid = uuid::Uuid::from_bytes(probe_layout.partition("root").unwrap().guid);
    let esp = make_esp(root_uuid);
    let layout = plan(Size::Auto, &parts(fat32_min_size(&esp).unwrap()), seed).unwrap();
    assert_eq!(
        layout.partition("root").unwrap().guid,
        *root_uuid.as_bytes()
    );

    let disk = dir.path().join("kiln.raw");
    let mut file = std::fs::File::create(&disk).unwrap();
    file.set_len(layout.disk_size).unwrap();
    layout.write_table(&mut file).unwrap();
    let part = layout.partition("esp").unwrap();
    let mut region = Region::new(&mut file as &mut dyn WriteAt, part.offset, part.size);
    write_fat32(&esp, &mut region, part.size, &FatOptions::new(seed, epoch)).unwrap();
    drop(file);

    let mut opts = BootImageOptions::new("uefi", MARKER, Duration::from_secs(240));
    opts.serial_log = Some(dir.path().join("kiln-disk.log"));
    let report = verify::boot_image(&disk, &opts).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("kiln-written disk: {report}");
    let log = log_text(&report.serial_log);
    assert!(log.contains(&format!("root=PARTUUID={root_uuid}")), "{log}");
    assert!(report.powered_off);
    assert_gone(report.qemu_pid);
}

#[test]
fn missing_inputs_are_named() {
    let _one = qemu_lock();
    let dir = tempfile::tempdir().unwrap();
    let mut spec = BootSpec::new(
        profile("direct"),
        MARKER,
        Duration::from_secs(5),
        dir.path().join("log"),
    );
    let err = verify::boot(&spec).unwrap_err();
    assert!(matches!(err, VerifyError::KernelRequired { .. }), "{err}");
    spec.kernel = Some(dir.path().join("no-vmlinuz"));
    let err = verify::boot(&spec).unwrap_err().to_string();
    assert!(err.contains("no-vmlinuz"), "{err}");

    let mut uefi = profile("uefi");
    uefi.firmware.as_mut().unwrap().code = dir.path().join("OVMF_CODE_4M.fd");
    let disk = dir.path().join("disk.raw");
    std::fs::write(&disk, [0u8; 4096]).unwrap();
    let mut spec = BootSpec::new(uefi, MARKER, Duration::from_secs(5), dir.path().join("log"));
    spec.image = Some(disk);
    let err = verify::boot(&spec).unwrap_err().to_string();
    assert!(
        err.contains("ovmf") && err.contains("OVMF_CODE_4M.fd"),
        "{err}"
    );

    let err = ProfileDir::locate(None)
        .unwrap()
        .load("nonesuch")
        .unwrap_err()
        .to_string();
    assert!(err.contains("direct") && err.contains("uefi"), "{err}");

    // QEMU refusing its arguments: its own message is in the error.
    let mut odd = profile("direct");
    odd.machine = "no-such-machine".into();
    let kernel = dir.path().join("vmlinuz");
    std::fs::write(&kernel, b"not a kernel").unwrap();
    let mut spec = BootSpec::new(odd, MARKER, Duration::from_secs(30), dir.path().join("log"));
    spec.kernel = Some(kernel);
    spec.accel = Some(Accel::Tcg);
    let err = verify::boot(&spec).unwrap_err();
    assert!(matches!(err, VerifyError::Exited { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("QEMU said") && text.contains("unsupported machine type"),
        "{text}"
    );
    assert_eq!(qemu_children(), Vec::<u32>::new());

    // The message for a missing QEMU names the Debian package.
    let missing = VerifyError::QemuMissing {
        binary: "qemu-system-x86_64".into(),
    }
    .to_string();
    assert!(missing.contains("qemu-system-x86"), "{missing}");
}

#[test]
fn kvm_probe_is_definite_and_matches_a_real_kvm_boot() {
    let _one = qemu_lock();
    let qemu = verify::qemu::find_qemu().unwrap();
    let probe = accel::probe(&qemu);
    eprintln!(
        "KVM probe ({:?}): {:?}: {}",
        probe.took, probe.accel, probe.detail
    );
    assert!(!probe.detail.is_empty());
    assert_eq!(probe.kvm_usable, probe.accel == Accel::Kvm);
    assert!(
        probe.took < accel::PROBE_TIMEOUT + Duration::from_secs(3),
        "{probe:?}"
    );
    // The cached answer is the same and comes back at once.
    let cached = accel::probe_cached(&qemu);
    assert_eq!(cached.accel, probe.accel);
    let start = Instant::now();
    accel::probe_cached(&qemu);
    assert!(start.elapsed() < Duration::from_millis(50));

    // The oracle: force KVM for a real kernel boot. If the probe says KVM is unusable, the kernel
    // must not get as far as its banner; if usable, the boot must succeed.
    let dir = tempfile::tempdir().unwrap();
    let mut spec = direct_spec(dir.path(), MARKER, Duration::from_secs(10), "/init");
    spec.accel = Some(Accel::Kvm);
    let result = verify::boot(&spec);
    let log = log_text(&spec.serial_log);
    if probe.kvm_usable {
        let report = result.unwrap_or_else(|e| panic!("probe said KVM works, but: {e}"));
        assert_eq!(report.accel, Accel::Kvm);
    } else {
        let err = result.expect_err("probe said KVM cannot run guests, yet a KVM boot worked");
        eprintln!(
            "forced KVM boot failed as the probe predicted: {}",
            err.to_string().lines().next().unwrap_or("")
        );
        assert!(
            !log.contains("Linux version"),
            "the kernel ran under KVM:\n{log}"
        );
        assert!(probe.detail.contains("using TCG"), "{}", probe.detail);
    }
    // On hosts whose KVM is the paravirtual kvm_pvm (these build machines), the answer is TCG.
    if Path::new("/sys/module/kvm_pvm").exists() {
        assert_eq!(probe.accel, Accel::Tcg, "{}", probe.detail);
    }
    assert_eq!(qemu_children(), Vec::<u32>::new());
}
