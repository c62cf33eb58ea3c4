//! The verify stage: boot the disk under each machine profile (the request's, else the
//! recipe's `verify.profile`, else `direct`) until the recipe's marker appears on the serial
//! console — a recorded step per profile — and record each passing boot of that image with that
//! marker ([`VERIFIED`]): the publish stage signs nothing else.

use super::{
    Artifacts, DiskOut, Handover, Need, Partitions, StageEnv, StageError, StageRun, StageWork,
    intact, io, kernel_cmdline, with_ticker,
};
use crate::bus;
use crate::digest::Digest256;
use crate::pipeline::records::key_part;
use crate::verify::{self, BootImageOptions};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub struct VerifyStage;

/// What a boot proved (recorded by image digest, profile and marker).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BootSummary {
    pub profile: String,
    /// The serial console of this boot.
    pub serial_log: Option<PathBuf>,
    /// The serial log's content as a blob, so that a host other than the one that booted the
    /// image can deliver it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_log_blob: Option<Digest256>,
    pub accel: String,
    pub time_to_first_output: Option<f64>,
    pub time_to_kernel: Option<f64>,
    pub time_to_marker: f64,
    pub total: f64,
    pub marker_line: String,
    /// What the kernel said about UEFI Secure Boot (`Secure boot enabled`), when it said it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure_boot: Option<String>,
    /// The dm-verity root hash the root was mounted with (kiln's initramfs says it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verity_root_hash: Option<String>,
}

/// The boots of the verify stage, in the order of the profiles, and its signed boot
/// attestation; its message carries each boot under `verify.<profile>`, the attestation under
/// `attestation`.
#[derive(Debug, Clone, Default)]
pub struct VerifyOut(pub Vec<BootSummary>, pub Option<Digest256>);

impl Serialize for VerifyOut {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(self.0.len() + 1))?;
        for boot in &self.0 {
            map.serialize_entry(&format!("verify.{}", boot.profile), boot)?;
        }
        if let Some(a) = &self.1 {
            map.serialize_entry("attestation", a)?;
        }
        map.end()
    }
}

/// The key of one boot (fields sorted, as the JSON keys).
#[derive(Serialize)]
struct BootKey<'a> {
    cmdline: String,
    expect: &'a Option<String>,
    image: &'a Digest256,
    initrd: &'a Option<Digest256>,
    /// The machine profile's settings (see [`key_part`]).
    machine: serde_json::Value,
    profile: &'a str,
    vmlinuz: &'a Digest256,
}

/// The records of boots that passed: one per image, marker and profile, written by the verify
/// stage itself whenever a boot of that image printed that marker. The publish stage signs only
/// images with such records, whatever the message that triggered it claims.
pub const VERIFIED: &str = "verified";

/// The key of a [`VERIFIED`] record.
pub fn verified_key(image: &Digest256, expect: &Option<String>, profile: &str) -> Digest256 {
    #[derive(Serialize)]
    struct Key<'a> {
        expect: &'a Option<String>,
        image: &'a Digest256,
        profile: &'a str,
    }
    super::stage_key(
        VERIFIED,
        1,
        &Key {
            expect,
            image,
            profile,
        },
    )
}

/// A [`VERIFIED`] record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VerifiedBoot {
    pub image: Digest256,
    pub profile: String,
    pub expect: Option<String>,
    /// The key of the boot step that passed.
    pub boot: Digest256,
}

impl StageWork for VerifyStage {
    const STAGE: bus::Stage = bus::Stage::Verify;
    type Output = VerifyOut;

    fn needs(_env: &StageEnv, h: &Handover) -> Vec<Need> {
        let Some(build) = &h.build else {
            return Vec::new();
        };
        let mut out: Vec<Need> = build.kernel.iter().flat_map(|k| k.blobs()).collect();
        out.extend(build.disk.iter().map(|d| Need::Blob(d.image.clone())));
        out
    }

    fn run(run: &mut StageRun<'_>, h: &Handover) -> Result<VerifyOut, StageError> {
        let build = h.artifacts()?;
        let mut out = VerifyOut::default();
        let mut machines = Vec::new();
        for profile in profiles(&h.request, &build.loaded) {
            let (summary, machine) = boot(run, build, &profile)?;
            out.0.push(summary);
            machines.push(machine);
        }
        if let Some(key) = &run.env.verifier
            && !out.0.is_empty()
        {
            out.1 = Some(attest_boots(run.env, key, build, &out.0, &machines)?);
        }
        Ok(out)
    }

    fn apply(h: &mut Handover, out: &VerifyOut) {
        if let Some(b) = &mut h.build {
            b.boots.extend(out.0.iter().cloned());
            b.boot_attestation = out.1.clone();
        }
    }

    fn produced(h: &Handover) -> Vec<Need> {
        let Some(b) = &h.build else {
            return Vec::new();
        };
        b.boots
            .iter()
            .filter_map(|b| b.serial_log_blob.clone())
            .chain(b.boot_attestation.clone())
            .map(Need::IfHere)
            .collect()
    }
}

/// The profiles to boot: none with `--no-verify`, else the request's, else the recipe's, else
/// [`verify::profile::DEFAULT_PROFILE`].
fn profiles(request: &bus::BuildRequest, loaded: &crate::recipe::Loaded) -> Vec<String> {
    if !request.verify {
        return Vec::new();
    }
    if !request.profiles.is_empty() {
        return request.profiles.clone();
    }
    vec![
        loaded
            .recipe
            .verify
            .profile
            .clone()
            .unwrap_or_else(|| verify::profile::DEFAULT_PROFILE.into()),
    ]
}

/// When a profile this build will boot with lets the KVM probe choose the accelerator, start the
/// probe now, so that it runs beside the stages before verify rather than after them.
pub(super) fn probe_ahead(
    env: &StageEnv,
    request: &bus::BuildRequest,
    loaded: &crate::recipe::Loaded,
) {
    let Ok(dir) = verify::profile::ProfileDir::locate(env.profiles_dir.as_deref()) else {
        return;
    };
    let probes = profiles(request, loaded).iter().any(|p| {
        dir.load(p)
            .is_ok_and(|m| m.accel != verify::profile::AccelChoice::Tcg)
    });
    if probes && let Ok(qemu) = verify::qemu::find_qemu() {
        verify::accel::probe_in_background(qemu);
    }
}

/// Sign what the boots proved, with the verifier key, as an in-toto Statement about the disk
/// (predicate [`attest::PREDICATE_BOOT`], docs/attestations.md) in a DSSE envelope; the
/// envelope is stored as a blob, for the publish stage to attach to the image.
fn attest_boots(
    env: &StageEnv,
    key: &crate::store::SigningKey,
    build: &Artifacts,
    boots: &[BootSummary],
    machines: &[verify::profile::Profile],
) -> Result<Digest256, StageError> {
    use crate::store::attest::{self, Envelope, Statement};
    let disk = build.disk()?;
    let kernel = build.kernel()?;
    let mut list = Vec::new();
    for (b, m) in boots.iter().zip(machines) {
        let mut firmware = Vec::new();
        if let Some(f) = &m.firmware {
            for path in [&f.code, &f.vars] {
                let digest = std::fs::File::open(path)
                    .and_then(|mut file| crate::digest::hash_file(&mut file))
                    .map_err(io(format!("reading the firmware {}", path.display())))?
                    .0;
                firmware.push(serde_json::json!({
                    "path": path.display().to_string(), "sha256": digest.hex(),
                }));
            }
        }
        list.push(serde_json::json!({
            "profile": b.profile,
            "machine": m.machine,
            "boot": key_part(&m.boot),
            "accelerator": b.accel,
            "firmware": firmware,
            "kernelCommandLine": kernel_cmdline(&build.loaded, kernel),
            "timeToMarker": b.time_to_marker,
            "markerLine": b.marker_line,
            "secureBoot": b.secure_boot,
            "verityRootHash": b.verity_root_hash,
            "serialLog": b.serial_log_blob.as_ref().map(|d| serde_json::json!({"sha256": d.hex()})),
            "result": "passed",
        }));
    }
    let predicate = serde_json::json!({
        "image": { "sha256": disk.image.hex(), "format": disk.format },
        "recipe": { "name": build.loaded.recipe.name, "inputs": build.loaded.inputs },
        "kernel": { "version": kernel.version, "sha256": kernel.vmlinuz.hex() },
        "marker": build.loaded.recipe.verify.expect,
        "boots": list,
        "verifier": {
            "id": format!("urn:kiln:verifier:{}", crate::pipeline::worker::host_name()),
            "kiln": env!("CARGO_PKG_VERSION"),
        },
    });
    let statement = Statement::new("disk", &disk.image, attest::PREDICATE_BOOT, predicate);
    let bytes = serde_json::to_vec(&statement).map_err(|e| StageError::Record {
        what: "the boot attestation".into(),
        source: std::io::Error::other(e),
    })?;
    let envelope = Envelope::seal(key, attest::PAYLOAD_IN_TOTO, &bytes);
    let bytes = serde_json::to_vec(&envelope).map_err(|e| StageError::Record {
        what: "the boot attestation".into(),
        source: std::io::Error::other(e),
    })?;
    let (digest, _) = env
        .blobs
        .put_bytes(&bytes)
        .map_err(io("storing the boot attestation"))?;
    Ok(digest)
}

/// One boot under `profile` (a recorded step), and its [`VERIFIED`] record; the summary and the
/// machine profile it booted.
fn boot(
    run: &mut StageRun<'_>,
    build: &Artifacts,
    profile: &str,
) -> Result<(BootSummary, verify::profile::Profile), StageError> {
    let env = run.env;
    let kernel_out = build.kernel()?;
    let disk_out = build.disk()?;
    let expect = &build.loaded.recipe.verify.expect;
    // The profile's settings, not only its name: a changed machine boots again.
    let machine =
        verify::profile::ProfileDir::locate(env.profiles_dir.as_deref())?.load(profile)?;
    let key = BootKey {
        cmdline: kernel_cmdline(&build.loaded, kernel_out),
        expect,
        image: &disk_out.image,
        initrd: &kernel_out.initrd,
        machine: key_part(&machine),
        profile,
        vmlinuz: &kernel_out.vmlinuz,
    };
    let summary = run.step("verify", 1, &key, |run| {
        // What boots is checked against its digest now: a memoized hash is not enough.
        intact(env, &disk_out.image)?;
        intact(env, &kernel_out.vmlinuz)?;
        if let Some(initrd) = &kernel_out.initrd {
            intact(env, initrd)?;
        }
        let log = default_serial_log(env, disk_out, profile);
        let tick = |elapsed: Duration| {
            let line = last_line(&log, 100).unwrap_or_default();
            run.progress(
                None,
                format!("booting {profile} {:.1} s: {line}", elapsed.as_secs_f64()),
            );
        };
        let summary = with_ticker(Duration::from_millis(250), tick, || {
            verify_boot(env, build, profile, Some(log.clone()))
        })?;
        if crate::systemd::reports_state(&build.loaded.recipe.rootfs) {
            let serial = summary
                .serial_log
                .as_ref()
                .and_then(|p| std::fs::read_to_string(p).ok())
                .unwrap_or_default();
            let log_name = summary
                .serial_log
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            crate::systemd::check_system_state(&summary.marker_line, &serial, &log_name)?;
        }
        Ok(summary)
    })?;
    // What the publish stage checks before it signs: this host booted this image to this marker.
    let proof = verified_key(&disk_out.image, expect, profile);
    if run.records.get(VERIFIED, &proof).is_none() {
        let record = VerifiedBoot {
            image: disk_out.image.clone(),
            profile: profile.to_string(),
            expect: expect.clone(),
            boot: super::stage_key("verify", 1, &key),
        };
        let value = serde_json::to_value(&record).map_err(|e| StageError::Record {
            what: "the verified boot".into(),
            source: std::io::Error::other(e),
        })?;
        run.records
            .put(VERIFIED, &proof, &value)
            .map_err(|source| StageError::Record {
                what: "the verified boot".into(),
                source,
            })?;
    }
    Ok((summary, machine))
}

/// The last non-empty line of a (growing) text file, printable characters only, at most
/// `max` characters.
fn last_line(path: &Path, max: usize) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(4096))).ok()?;
    let mut buf = Vec::new();
    file.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf);
    let line = text
        .lines()
        .map(|l| l.chars().filter(|c| !c.is_control()).collect::<String>())
        .rfind(|l| !l.trim().is_empty())?;
    Some(line.trim().chars().take(max).collect())
}

/// Where the serial log of a boot goes when the caller does not say: beside the cached image.
fn default_serial_log(env: &StageEnv, disk: &DiskOut, profile: &str) -> PathBuf {
    env.home
        .join("logs")
        .join(format!("{}.{profile}.serial.log", disk.image.hex()))
}

/// Boot the built image under `profile` (the cached blob, attached with snapshot=on).
fn verify_boot(
    env: &StageEnv,
    build: &Artifacts,
    profile: &str,
    serial_log: Option<PathBuf>,
) -> Result<BootSummary, StageError> {
    let kernel_out = build.kernel()?;
    let disk_out = build.disk()?;
    let recipe = &build.loaded.recipe;
    let expect = recipe.verify.expect.clone().unwrap_or_default();
    let timeout = Duration::from_secs(recipe.verify.timeout.unwrap_or(120));
    let log = serial_log.unwrap_or_else(|| default_serial_log(env, disk_out, profile));
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    }
    let method = verify::profile::ProfileDir::locate(env.profiles_dir.as_deref())?
        .load(profile)?
        .boot;
    let mut bo = BootImageOptions::new(profile, expect, timeout);
    bo.profiles_dir = env.profiles_dir.clone();
    if method == verify::profile::BootMethod::Direct {
        bo.kernel = Some(env.blobs.path(&kernel_out.vmlinuz));
        bo.initrd = kernel_out.initrd.as_ref().map(|d| env.blobs.path(d));
        bo.cmdline = match &disk_out.root_hash {
            // A dm-verity root is found from its hash, as the image's own command line says.
            Some(hash) => format!(
                "{} roothash={hash}",
                kernel_cmdline(&build.loaded, kernel_out)
            ),
            None => format!(
                "{} root=PARTUUID={}",
                kernel_cmdline(&build.loaded, kernel_out),
                Partitions::of(&build.loaded).root
            ),
        };
    }
    bo.serial_log = Some(log.clone());
    let report = verify::boot_image(&env.blobs.path(&disk_out.image), &bo)?;
    let secs = |d: Option<Duration>| d.map(|d| d.as_secs_f64());
    let serial_log_blob = std::fs::File::open(&log)
        .and_then(|mut f| env.blobs.put(&mut f))
        .map(|(digest, _)| digest)
        .ok();
    Ok(BootSummary {
        profile: profile.to_string(),
        serial_log: Some(log),
        serial_log_blob,
        accel: report.accel.to_string(),
        time_to_first_output: secs(report.time_to_first_output),
        time_to_kernel: secs(report.time_to_kernel),
        time_to_marker: report.time_to_marker.as_secs_f64(),
        total: report.total.as_secs_f64(),
        marker_line: report.marker_line.clone(),
        secure_boot: report.secure_boot.clone(),
        verity_root_hash: report.verity_root_hash.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Typed keys serialise to the bytes of the JSON objects earlier kiln versions hashed.
    #[test]
    fn keys_keep_their_bytes() {
        let d = Digest256::from_sha256(&[1u8; 32]);
        let expect = Some("marker".to_string());
        let old = crate::pipeline::records::stage_key(
            VERIFIED,
            1,
            &json!({ "image": d, "expect": expect, "profile": "direct" }),
        );
        assert_eq!(verified_key(&d, &expect, "direct"), old);
        let machine = verify::profile::ProfileDir::locate(None)
            .unwrap()
            .load("uefi")
            .unwrap();
        let initrd = None;
        let typed = BootKey {
            cmdline: "console=ttyS0".into(),
            expect: &expect,
            image: &d,
            initrd: &initrd,
            machine: key_part(&machine),
            profile: "uefi",
            vmlinuz: &d,
        };
        let old = json!({
            "image": d, "profile": "uefi", "machine": machine, "expect": expect,
            "vmlinuz": d, "initrd": initrd, "cmdline": "console=ttyS0",
        });
        assert_eq!(
            serde_json::to_vec(&typed).unwrap(),
            serde_json::to_vec(&old).unwrap()
        );
    }
}
