//! Application servers: `kiln agent` runs on a hypervisor host, watches one `repository:tag` on
//! `kiln.image.published.<repository>`, and runs the newest image that passes its checks.
//!
//! For each announcement of its tag (and, at start, the last one already in the stream) it
//! 1. pulls the image by digest into `<state-dir>/images/` with [`crate::store::pull`]: digests
//!    and the ed25519 signature are checked against `--trust`, an interrupted download resumes
//!    with `Range`; a refused image is reported on `kiln.deploy.<agent>.failed` and nothing boots;
//! 2. boots it ([`vm`]): a qcow2 overlay on the pulled image, QEMU daemonized with a QMP socket,
//!    the serial console in a file, user-mode networking forwarding a loopback port to the
//!    guest's health port, and the SMBIOS serial `kiln-agent` that tells a kiln image to run its
//!    `deploy.run` application instead of powering off;
//! 3. waits for health: the serial marker and/or an answer on the forwarded port, within the
//!    timeout (from the image's `dev.kiln.deploy` annotation, i.e. the recipe's `deploy:`
//!    section, unless the command line overrides it);
//! 4. healthy: switches its proxy ([`proxy`], `--listen`) to the new VM, stops the old one with
//!    QMP `quit`, and reports `kiln.deploy.<agent>.completed`; unhealthy: kills the new VM, the
//!    old one keeps running, and `kiln.deploy.<agent>.failed` says why (rollback);
//! 5. keeps checking the running VM every `--health-interval` ([`check_health`]): after
//!    `--health-retries` failures in a row it restarts the VM once, and the next time goes back
//!    to the image before it ([`heal`]).
//!
//! It also deploys the images rollout controllers order on `kiln.agent.<agent>.deploy`
//! ([`obey`]: each order once, answered with its id), and goes back from a running image that
//! `kiln revoke` announces on `kiln.image.revoked.<repository>` ([`go_back`]).
//!
//! The state ([`state`]) is a JSON file written atomically after every change. A restarted agent
//! stops the VMs it started but does not track (a deploy it was killed in the middle of:
//! [`vm::reap_strays`]), re-adopts the VM it finds in the state when its QEMU is alive and
//! answers QMP `query-status`, and boots the same image again when it is gone. VMs outlive the agent on purpose: stopping the
//! agent does not stop the application.

pub mod proxy;
pub mod state;
pub mod vm;

use crate::bus::{
    Bus, BusError, DeployCompleted, DeployFailed, DeployOrder, ErrorInfo, ErrorKind, EventTime,
    ImagePublished, ImageRevoked, VERSION, subjects,
};
use crate::store::{self, Reference, StoreError, StoreOptions, VerifyingKey};
use crate::task::blocking;
use futures::StreamExt;
use serde_json::Value;
use state::{AgentState, HealthSpec, VmRecord};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long a swap waits for the connections open to the old VM to end before stopping it.
const DRAIN: Duration = Duration::from_secs(10);
/// How long a VM may take to quit after QMP `quit` before it is killed.
const QUIT_GRACE: Duration = Duration::from_secs(10);
/// Health timeout when neither the image nor the command line gives one.
pub const DEFAULT_HEALTH_TIMEOUT: u64 = 120;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Key(#[from] store::KeyError),
    #[error(transparent)]
    Verify(#[from] crate::verify::VerifyError),
    #[error("cannot {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("agent state {path}: {reason}")]
    State { path: PathBuf, reason: String },
    #[error("QMP on {socket}: {reason}")]
    Qmp { socket: PathBuf, reason: String },
    #[error("QEMU: {0}")]
    Qemu(String),
    #[error("{0}")]
    Config(String),
}

/// What `kiln agent` was told.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Agent (host) name in subjects and messages.
    pub name: String,
    /// Repository as announced, e.g. `registry:5000/team/web`.
    pub repository: String,
    pub tag: String,
    /// The public key images must be signed with.
    pub trust: PathBuf,
    /// Public keys of the verifiers whose boot attestations count.
    pub trust_verifiers: Vec<PathBuf>,
    /// What an image must carry besides its signature (always checked): boot, sbom, provenance.
    pub require: Vec<store::Requirement>,
    pub state_dir: PathBuf,
    /// QEMU machine profile (UEFI) and the directory to find it in.
    pub profile: String,
    pub profiles_dir: Option<PathBuf>,
    /// The stable address clients use; forwarded to the running VM's health port.
    pub listen: Option<SocketAddr>,
    /// Overrides of the image's deploy settings.
    pub health_serial: Option<String>,
    pub health_port: Option<u16>,
    pub health_timeout: Option<u64>,
    pub store: StoreOptions,
    /// Groups this agent joins (`--group`), for `kiln agents --group` and rollouts.
    pub groups: Vec<String>,
    /// How often the agent records its heartbeat in the `kiln-agents` bucket.
    pub heartbeat: Duration,
    /// How often the running VM's health is checked (zero: never).
    pub health_interval: Duration,
    /// Failed checks in a row before the agent restarts the VM or goes back.
    pub health_retries: u32,
    /// Pulled images kept (the running one and the one before it always are): the seeds of
    /// delta pulls.
    pub keep: usize,
}

/// Split `REPO:TAG` (the tag is after the last `:` that follows the last `/`).
pub fn parse_watch(text: &str) -> Result<(String, String), AgentError> {
    let slash = text.rfind('/').unwrap_or(0);
    match text.rfind(':') {
        Some(i) if i > slash && i + 1 < text.len() => {
            let tag = &text[i + 1..];
            if !store::reference::valid_tag(tag) {
                return Err(AgentError::Config(format!(
                    "--watch {text}: {tag:?} is not a valid tag"
                )));
            }
            Ok((text[..i].to_string(), tag.to_string()))
        }
        _ => Err(AgentError::Config(format!(
            "--watch {text}: expected REPOSITORY:TAG, e.g. 127.0.0.1:5000/team/web:production"
        ))),
    }
}

/// What the agent reports as it works (printed by `kiln agent`, with `--json` as JSON lines).
pub type Report = Box<dyn Fn(&AgentEvent) + Send + Sync>;

/// One thing the agent did, as `kiln agent --json` prints it: an object with its `kind`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum AgentEvent {
    /// Started, and watching the tag (after re-adopting or rebooting what ran before).
    Ready {
        agent: String,
        /// `repository:tag`.
        watch: String,
        /// The reference of the image running now.
        running: Option<String>,
        /// Its QEMU's process id.
        pid: Option<u32>,
        /// The stable address forwarded to the running VM.
        listen: Option<String>,
    },
    /// An image runs: the message published on `kiln.deploy.<agent>.completed`.
    Completed(DeployCompleted),
    /// An image was refused or did not become healthy: `kiln.deploy.<agent>.failed`.
    Failed(DeployFailed),
}

/// The VM a deploy started, as `DeployCompleted.vm` carries it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
struct VmReport<'a> {
    id: u64,
    pid: u32,
    qmp: &'a Path,
    serial_log: &'a Path,
    guest_port: Option<u16>,
    host_port: Option<u16>,
    seconds_to_healthy: Option<f64>,
}

/// Whether a message announces the watched tag of the watched repository.
pub fn announces(msg: &ImagePublished, repository: &str, tag: &str) -> bool {
    if msg.repository != repository {
        return false;
    }
    let ref_tag = msg
        .reference
        .split('@')
        .next()
        .and_then(|r| {
            let slash = r.rfind('/').unwrap_or(0);
            r.rfind(':').filter(|i| *i > slash).map(|i| &r[i + 1..])
        })
        .unwrap_or("latest");
    ref_tag == tag || msg.tags.iter().any(|t| t == tag)
}

/// How to run an image: from its `dev.kiln.deploy` annotation and the command line.
struct RunSettings {
    health: HealthSpec,
    memory_mib: Option<u32>,
    cpus: Option<u32>,
    application: Option<String>,
}

/// The deploy settings an image carries (`dev.kiln.deploy`), with the command line's overrides.
fn health_for(
    config: &AgentConfig,
    annotations: &std::collections::BTreeMap<String, String>,
) -> Result<RunSettings, String> {
    let d: Value = annotations
        .get(store::ANN_DEPLOY)
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or(Value::Null);
    let port = config.health_port.or_else(|| {
        d["health_port"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
    });
    let mut serial = config
        .health_serial
        .clone()
        .or_else(|| d["health_serial"].as_str().map(str::to_string));
    if serial.is_none() && port.is_none() {
        serial = d["verify_marker"].as_str().map(str::to_string);
    }
    if serial.is_none() && port.is_none() {
        return Err(
            "the image names no health check (recipe deploy.health_serial/health_port or verify.expect) and none was given (--health-serial, --health-port)".into(),
        );
    }
    let timeout_s = config
        .health_timeout
        .or_else(|| d["health_timeout"].as_u64())
        .unwrap_or(DEFAULT_HEALTH_TIMEOUT);
    let memory = d["memory_mib"].as_u64().and_then(|v| u32::try_from(v).ok());
    let cpus = d["cpus"].as_u64().and_then(|v| u32::try_from(v).ok());
    Ok(RunSettings {
        health: HealthSpec {
            serial,
            port,
            timeout_s,
        },
        memory_mib: memory,
        cpus,
        application: d["application"].as_str().map(str::to_string),
    })
}

/// The result of acting on one announcement.
enum Deployed {
    Completed(DeployCompleted),
    Failed(DeployFailed),
}

fn vm_json(vm: &VmRecord, seconds: Option<f64>) -> Value {
    let report = VmReport {
        id: vm.id,
        pid: vm.pid,
        qmp: &vm.qmp,
        serial_log: &vm.serial_log,
        guest_port: vm.guest_port,
        host_port: vm.host_port,
        seconds_to_healthy: seconds,
    };
    serde_json::to_value(report).unwrap_or(Value::Null)
}

fn failed(
    config: &AgentConfig,
    msg: &ImagePublished,
    application: &str,
    kind: ErrorKind,
    message: String,
    state: &AgentState,
    booted: bool,
) -> Deployed {
    Deployed::Failed(DeployFailed {
        v: VERSION,
        agent: config.name.clone(),
        build: Some(msg.build.clone()).filter(|b| !b.is_empty()),
        application: application.to_string(),
        reference: msg.reference.clone(),
        error: ErrorInfo::new(kind, &message),
        rolled_back: booted && state.current.is_some(),
        running: state.current.as_ref().map(|c| c.reference.clone()),
        order: None,
        time: EventTime::now(),
    })
}

/// The reference to pull: the announced image pinned to its digest.
fn pull_reference(msg: &ImagePublished) -> String {
    let base = msg.reference.split('@').next().unwrap_or(&msg.reference);
    match Reference::parse(base) {
        Ok(r) if matches!(r.location, store::Location::Registry { .. }) => {
            match crate::digest::Digest256::parse(&msg.digest) {
                Some(d) => Reference { tag: None, ..r }.with_digest(&d),
                None => base.to_string(),
            }
        }
        _ => base.to_string(),
    }
}

/// Pull, boot, check and swap (blocking). `state` is updated and saved.
fn deploy(
    config: &AgentConfig,
    trust: &VerifyingKey,
    verifiers: &[VerifyingKey],
    state: &mut AgentState,
    msg: &ImagePublished,
    received: Instant,
    backend: &proxy::Backend,
) -> Result<Deployed, AgentError> {
    let default_app = config
        .repository
        .rsplit('/')
        .next()
        .unwrap_or(&config.repository)
        .to_string();
    let images = config.state_dir.join("images");
    std::fs::create_dir_all(&images).map_err(|source| AgentError::Io {
        what: "create",
        path: images.clone(),
        source,
    })?;
    let hex = msg.digest.strip_prefix("sha256:").unwrap_or(&msg.digest);
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(failed(
            config,
            msg,
            &default_app,
            ErrorKind::InvalidMessage,
            format!("the announced digest {:?} is not sha256:<hex>", msg.digest),
            state,
            false,
        ));
    }
    let image = images.join(format!("{hex}.img"));
    let pull_ref = pull_reference(msg);
    // What the image must carry besides its signature (a boot attestation by a trusted
    // verifier, by default), checked before a byte of the disk is fetched.
    if config
        .require
        .iter()
        .any(|r| *r != store::Requirement::Signature)
    {
        let refused = match store::verify_image(
            &pull_ref,
            trust,
            verifiers,
            &config.require,
            &config.store,
        ) {
            Ok(report) if report.ok => None,
            Ok(report) => Some((
                ErrorKind::Verification,
                report
                    .checks
                    .iter()
                    .filter(|c| c.required && c.status != "verified")
                    .map(|c| format!("required {} is {}: {}", c.what, c.status, c.detail))
                    .collect::<Vec<_>>()
                    .join("; "),
            )),
            Err(e @ (StoreError::Http { .. } | StoreError::Io { .. })) => {
                Some((ErrorKind::Transient, crate::error::Chain(&e).to_string()))
            }
            Err(e) => Some((ErrorKind::Verification, crate::error::Chain(&e).to_string())),
        };
        if let Some((kind, why)) = refused {
            return Ok(failed(
                config,
                msg,
                &default_app,
                kind,
                format!("refused {pull_ref}, nothing was booted: {why}"),
                state,
                false,
            ));
        }
    }
    // Earlier images kept here seed a delta pull: only the chunks they lack are fetched.
    let seeds = kept_images(&images);
    let pulled = match store::pull_seeded(&pull_ref, &image, Some(trust), &seeds, &config.store) {
        // A chunk index that does not describe the signed image is refused; the whole disk
        // (checked against the signed digest) is still good.
        Err(e @ StoreError::Malformed { .. }) if !seeds.is_empty() => {
            tracing::warn!(
                "{}; pulling the whole disk instead",
                crate::error::Chain(&e)
            );
            let _ = std::fs::remove_file(store::partial_path(&image));
            store::pull(&pull_ref, &image, Some(trust), &config.store)
        }
        other => other,
    };
    let report = match pulled {
        Ok(r) => r,
        Err(e) => {
            // A refused download is not kept for resuming: its bytes are not trusted.
            let _ = std::fs::remove_file(&image);
            let _ = std::fs::remove_file(store::partial_path(&image));
            let kind = match e {
                StoreError::Http { .. } | StoreError::Io { .. } => ErrorKind::Transient,
                _ => ErrorKind::Verification,
            };
            return Ok(failed(
                config,
                msg,
                &default_app,
                kind,
                format!(
                    "refused {pull_ref}, nothing was booted: {}",
                    crate::error::Chain(&e)
                ),
                state,
                false,
            ));
        }
    };
    if report.manifest_digest.to_string() != msg.digest {
        let _ = std::fs::remove_file(&image);
        return Ok(failed(
            config,
            msg,
            &default_app,
            ErrorKind::Verification,
            format!(
                "refused {pull_ref}, nothing was booted: the registry served manifest {} but {} was announced (the tag moved)",
                report.manifest_digest, msg.digest
            ),
            state,
            false,
        ));
    }
    if report.format != "qcow2" {
        return Ok(failed(
            config,
            msg,
            &default_app,
            ErrorKind::Verification,
            format!(
                "{pull_ref} is a {} disk; the agent runs qcow2 images (an overlay needs a qcow2 base)",
                report.format
            ),
            state,
            false,
        ));
    }
    let RunSettings {
        health,
        memory_mib,
        cpus,
        application: app,
    } = match health_for(config, &report.annotations) {
        Ok(h) => h,
        Err(why) => {
            return Ok(failed(
                config,
                msg,
                &default_app,
                ErrorKind::Verification,
                why,
                state,
                false,
            ));
        }
    };
    let application = app.unwrap_or(default_app);
    let id = state.next_vm;
    state.next_vm += 1;
    state.save(&config.state_dir)?;
    let req = vm::VmRequest {
        id,
        reference: msg.reference.clone(),
        digest: msg.digest.clone(),
        build: Some(msg.build.clone()).filter(|b| !b.is_empty()),
        application: application.clone(),
        image,
        health,
        memory_mib,
        cpus,
    };
    let started = Instant::now();
    let mut new = match vm::start(
        &config.state_dir,
        config.profiles_dir.as_deref(),
        &config.profile,
        &req,
    ) {
        Ok(v) => v,
        Err(e) => {
            return Ok(failed(
                config,
                msg,
                &application,
                ErrorKind::Internal,
                format!(
                    "could not start a VM for {}: {}",
                    msg.reference,
                    crate::error::Chain(&e)
                ),
                state,
                true,
            ));
        }
    };
    match vm::wait_healthy(&new, started) {
        Ok(boot) => {
            new.since = crate::time::rfc3339(now_ms() as i64, crate::time::Precision::Millis);
            let seconds = received.elapsed().as_secs_f64();
            let old = state.current.replace(new.clone());
            // The new VM takes new connections before the old one goes away.
            backend.set(new.host_port);
            state.previous = old.as_ref().map(|o| o.reference.clone());
            state.last_handled = Some(msg.digest.clone());
            state.save(&config.state_dir)?;
            if let Some(old) = &old {
                // Requests already on their way to the old VM finish there first.
                if let Some(port) = old.host_port
                    && !backend.drain(port, DRAIN)
                {
                    tracing::warn!(
                        "{} connection(s) to the old VM still open after {} s; stopping it",
                        backend.open_to(port),
                        DRAIN.as_secs()
                    );
                }
                vm::stop(old, QUIT_GRACE);
            }
            // Keep the running image, the one before it (to go back to) and the newest others
            // up to --keep (seeds); drop the rest.
            let mut keep = vec![new.image.clone()];
            keep.extend(old.as_ref().map(|o| o.image.clone()));
            prune_images(&images, &keep, config.keep);
            tracing::info!(
                "{} healthy after {:.1} s (boot {:.1} s); running it",
                msg.reference,
                seconds,
                boot.as_secs_f64()
            );
            Ok(Deployed::Completed(DeployCompleted {
                v: VERSION,
                agent: config.name.clone(),
                build: new.build.clone(),
                application,
                reference: new.reference.clone(),
                previous: state.previous.clone(),
                vm: vm_json(&new, Some(seconds)),
                order: None,
                cause: None,
                pull: Some(pull_stats(&report)),
                time: EventTime::now(),
            }))
        }
        Err(why) => {
            vm::stop(&new, Duration::from_secs(2));
            state.last_handled = Some(msg.digest.clone());
            state.save(&config.state_dir)?;
            let what = match &state.current {
                Some(c) => format!("; {} keeps running", c.reference),
                None => String::new(),
            };
            Ok(failed(
                config,
                msg,
                &application,
                ErrorKind::Verification,
                format!("{} is not healthy: {why}{what}", msg.reference),
                state,
                true,
            ))
        }
    }
}

/// What pulling cost, for the deploy result.
fn pull_stats(report: &store::PullReport) -> crate::bus::PullStats {
    let delta = report.delta.clone().unwrap_or_default();
    crate::bus::PullStats {
        bytes: report.bytes,
        fetched_bytes: report.transferred,
        reused_bytes: delta.reused_bytes + delta.resumed_bytes,
        chunks: delta.chunks as u64,
        fetched_chunks: delta.fetched_chunks as u64,
        seconds: report.seconds,
    }
}

/// The pulled images in `dir` (`*.img`, not `.partial` leftovers), newest first.
fn kept_images(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut images: Vec<(std::time::SystemTime, PathBuf)> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "img"))
        .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
        .collect();
    images.sort_by(|a, b| b.cmp(a));
    images.into_iter().map(|(_, p)| p).collect()
}

/// Remove pulled images in `dir` but `keep` and the newest others up to `most` in all (the
/// seeds of the next delta pull), and every `.partial` leftover.
fn prune_images(dir: &Path, keep: &[PathBuf], most: usize) {
    let mut kept: Vec<PathBuf> = keep.to_vec();
    for image in kept_images(dir) {
        if kept.len() < most && !kept.contains(&image) {
            kept.push(image);
        }
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        if !kept.contains(&path)
            && let Err(err) = std::fs::remove_file(&path)
        {
            tracing::warn!("removing {}: {err}", path.display());
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// At start: adopt the VM in the state file when its QEMU answers, else boot its image again.
fn recover(
    config: &AgentConfig,
    state: &mut AgentState,
    backend: &proxy::Backend,
) -> Result<Option<Deployed>, AgentError> {
    let Some(cur) = state.current.clone() else {
        return Ok(None);
    };
    if vm::answers(&cur) {
        tracing::info!(
            "re-adopted VM {} (QEMU pid {}) running {}",
            cur.id,
            cur.pid,
            cur.reference
        );
        backend.set(cur.host_port);
        return Ok(None);
    }
    tracing::warn!(
        "VM {} (pid {}) of {} is gone; booting it again",
        cur.id,
        cur.pid,
        cur.reference
    );
    let outcome = reboot(config, state, &cur)?;
    Ok(Some(match outcome {
        Ok(new) => {
            backend.set(new.host_port);
            state.current = Some(new.clone());
            state.save(&config.state_dir)?;
            Deployed::Completed(DeployCompleted {
                v: VERSION,
                agent: config.name.clone(),
                build: new.build.clone(),
                application: new.application.clone(),
                reference: new.reference.clone(),
                previous: Some(cur.reference.clone()),
                vm: vm_json(&new, None),
                order: None,
                cause: None,
                pull: None,
                time: EventTime::now(),
            })
        }
        Err(why) => {
            backend.set(None);
            Deployed::Failed(DeployFailed {
                v: VERSION,
                agent: config.name.clone(),
                build: cur.build.clone(),
                application: cur.application.clone(),
                reference: cur.reference.clone(),
                error: ErrorInfo::new(
                    ErrorKind::Verification,
                    &format!("restarting {} after its VM was gone: {why}", cur.reference),
                ),
                rolled_back: false,
                running: None,
                order: None,
                time: EventTime::now(),
            })
        }
    }))
}

/// Stop `cur` and boot its image again in a new VM (blocking): the new VM once it is healthy,
/// or why not (that VM is stopped then). `state.current` is cleared meanwhile; the caller puts
/// the new VM in.
fn reboot(
    config: &AgentConfig,
    state: &mut AgentState,
    cur: &VmRecord,
) -> Result<Result<VmRecord, String>, AgentError> {
    vm::stop(cur, Duration::from_secs(2));
    state.current = None;
    let id = state.next_vm;
    state.next_vm += 1;
    state.save(&config.state_dir)?;
    let req = vm::VmRequest {
        id,
        reference: cur.reference.clone(),
        digest: cur.digest.clone(),
        build: cur.build.clone(),
        application: cur.application.clone(),
        image: cur.image.clone(),
        health: cur.health.clone(),
        memory_mib: cur.memory_mib,
        cpus: cur.cpus,
    };
    let started = Instant::now();
    Ok(vm::start(
        &config.state_dir,
        config.profiles_dir.as_deref(),
        &config.profile,
        &req,
    )
    .map_err(|e| crate::error::chain_text(&e))
    .and_then(|mut new| match vm::wait_healthy(&new, started) {
        Ok(_) => {
            new.since = crate::time::rfc3339(now_ms() as i64, crate::time::Precision::Millis);
            Ok(new)
        }
        Err(why) => {
            vm::stop(&new, Duration::from_secs(2));
            Err(why)
        }
    }))
}

/// Whether the running VM is still healthy: its QEMU alive and, when it has a forwarded port,
/// an answer there. `Err` says what failed.
fn check_health(vm: &VmRecord) -> Result<(), String> {
    if !vm::alive(vm) {
        return Err(format!("its QEMU (pid {}) is gone", vm.pid));
    }
    if let Some(port) = vm.host_port
        && !vm::port_answers(port)
    {
        return Err(format!(
            "guest port {} (host 127.0.0.1:{port}) does not answer",
            vm.guest_port.unwrap_or_default()
        ));
    }
    Ok(())
}

/// What the health watch remembers of the running image.
#[derive(Debug, Default)]
struct HealthWatch {
    /// The digest these counts are about.
    digest: Option<String>,
    /// Failed checks in a row.
    failures: u32,
    /// The last failure.
    why: String,
    /// The VM was restarted once already for failing its checks.
    restarted: bool,
    /// Nothing more to try (no earlier image): do not report again until the image changes.
    given_up: bool,
}

/// After `--health-retries` failed checks in a row (blocking): restart the VM once; when it
/// fails its checks again (or the restart does not become healthy), go back to the image
/// before it and report `failed` with the reason.
fn heal(
    config: &AgentConfig,
    trust: &VerifyingKey,
    verifiers: &[VerifyingKey],
    state: &mut AgentState,
    watch: &mut HealthWatch,
    backend: &proxy::Backend,
) -> Result<Option<Deployed>, AgentError> {
    let Some(cur) = state.current.clone() else {
        return Ok(None);
    };
    let why = format!(
        "{} became unhealthy after it was deployed: {} ({} checks in a row, every {} s)",
        cur.reference,
        watch.why,
        watch.failures,
        config.health_interval.as_secs()
    );
    watch.failures = 0;
    let mut why = why;
    if !watch.restarted {
        watch.restarted = true;
        tracing::warn!("{why}; restarting its VM");
        match reboot(config, state, &cur)? {
            Ok(new) => {
                backend.set(new.host_port);
                state.current = Some(new.clone());
                state.save(&config.state_dir)?;
                return Ok(Some(Deployed::Completed(DeployCompleted {
                    v: VERSION,
                    agent: config.name.clone(),
                    build: new.build.clone(),
                    application: new.application.clone(),
                    reference: new.reference.clone(),
                    previous: state.previous.clone(),
                    vm: vm_json(&new, None),
                    order: None,
                    cause: Some(format!("restarted: {why}")),
                    pull: None,
                    time: EventTime::now(),
                })));
            }
            Err(e) => why = format!("{why}; the restarted VM did not become healthy: {e}"),
        }
    } else {
        why = format!("{why}; it was restarted once already");
        vm::stop(&cur, Duration::from_secs(2));
        state.current = None;
        backend.set(None);
        state.save(&config.state_dir)?;
    }
    // Back to the image before it, checked again like any image.
    let previous = state
        .previous
        .clone()
        .filter(|p| p.contains('@') && reference_digest(p) != cur.digest);
    let msg = crate::rollout::announcement_of(&config.repository, &cur.reference, &cur.digest);
    let Some(previous) = previous else {
        watch.given_up = true;
        return Ok(Some(failed(
            config,
            &msg,
            &cur.application,
            ErrorKind::Verification,
            format!("{why}; there is no earlier image to go back to"),
            state,
            false,
        )));
    };
    tracing::warn!("{why}; going back to {previous}");
    let back =
        crate::rollout::announcement_of(&config.repository, &previous, reference_digest(&previous));
    let outcome = deploy(
        config,
        trust,
        verifiers,
        state,
        &back,
        Instant::now(),
        backend,
    )?;
    let message = match &outcome {
        Deployed::Completed(_) => format!("{why}; went back to {previous}"),
        Deployed::Failed(f) => format!(
            "{why}; going back to {previous} failed: {}",
            f.error.message
        ),
    };
    let rolled_back = matches!(outcome, Deployed::Completed(_));
    // The image that failed counts as handled (a restarted agent does not deploy it again from
    // its announcement), and it is the one that ran before.
    state.last_handled = Some(cur.digest.clone());
    if rolled_back {
        state.previous = Some(cur.reference.clone());
    }
    state.save(&config.state_dir)?;
    let mut report = failed(
        config,
        &msg,
        &cur.application,
        ErrorKind::Verification,
        message,
        state,
        rolled_back,
    );
    if let Deployed::Failed(f) = &mut report {
        f.rolled_back = rolled_back;
    }
    Ok(Some(report))
}

/// The digest of a `repo:tag@sha256:…` reference (the whole text when it has none).
fn reference_digest(reference: &str) -> &str {
    reference
        .rsplit_once('@')
        .map_or(reference, |(_, digest)| digest)
}

/// Count a deploy's outcome in this process's metrics.
fn count(outcome: &Deployed) {
    let m = crate::metrics::global();
    match outcome {
        Deployed::Completed(c) => {
            m.deployment(&c.agent, "completed", false);
            m.running_image(&c.agent, &c.reference, reference_digest(&c.reference));
        }
        Deployed::Failed(f) => {
            m.deployment(&f.agent, "failed", f.rolled_back);
            if let Some(r) = &f.running {
                m.running_image(&f.agent, r, reference_digest(r));
            }
        }
    }
}

async fn announce(bus: &Bus, outcome: &Deployed, report: &Report) {
    count(outcome);
    let (r, event) = match outcome {
        Deployed::Completed(c) => (
            bus.publish_deploy_completed(c).await,
            AgentEvent::Completed(c.clone()),
        ),
        Deployed::Failed(f) => {
            tracing::warn!("deploy of {} failed: {}", f.reference, f.error.message);
            (
                bus.publish_deploy_failed(f).await,
                AgentEvent::Failed(f.clone()),
            )
        }
    };
    if let Err(e) = r {
        tracing::warn!(
            "cannot publish the deploy result: {}",
            crate::error::Chain(&e)
        );
    }
    report(&event);
}

impl From<tokio::task::JoinError> for AgentError {
    fn from(e: tokio::task::JoinError) -> AgentError {
        AgentError::Config(format!("agent task failed: {e}"))
    }
}

/// Run the agent until `shutdown` completes. VMs keep running after it returns.
pub async fn run(
    bus: &Bus,
    config: AgentConfig,
    report: Report,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let trust = store::load_verifying_key(&config.trust)?;
    let verifiers = config
        .trust_verifiers
        .iter()
        .map(|p| store::load_verifying_key(p))
        .collect::<Result<Vec<_>, _>>()?;
    std::fs::create_dir_all(&config.state_dir).map_err(|source| AgentError::Io {
        what: "create the state directory",
        path: config.state_dir.clone(),
        source,
    })?;
    let backend = proxy::Backend::default();
    let mut state = AgentState::load(&config.state_dir)?;
    // The stable address serves the VM that ran before at once, while the rest of the start
    // (stopping strays, checking that VM over QMP) goes on.
    if let Some(c) = state.current.as_ref().filter(|c| vm::alive(c)) {
        backend.set(c.host_port);
    }
    if let Some(addr) = config.listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| AgentError::Io {
                what: "listen on",
                path: PathBuf::from(addr.to_string()),
                source,
            })?;
        tokio::spawn(proxy::serve(listener, backend.clone()));
    }
    let (st, outcome) = {
        let config = config.clone();
        let backend = backend.clone();
        blocking::<_, AgentError>(move || {
            let mut st = state;
            vm::reap_strays(&config.state_dir, st.current.as_ref());
            let o = recover(&config, &mut st, &backend)?;
            Ok((st, o))
        })
        .await?
    };
    state = st;
    if let Some(o) = &outcome {
        announce(bus, o, &report).await;
    }
    if let Some(c) = &state.current {
        crate::metrics::global().running_image(
            &config.name,
            &c.reference,
            reference_digest(&c.reference),
        );
    }
    let status = std::sync::Arc::new(std::sync::Mutex::new(Status::of(&state, None)));
    let changed = std::sync::Arc::new(tokio::sync::Notify::new());
    let set_status = |s: Status| {
        *status.lock().unwrap_or_else(|e| e.into_inner()) = s;
        changed.notify_one();
    };
    let beats = tokio::spawn(send_heartbeats(
        bus.clone(),
        config.clone(),
        status.clone(),
        changed.clone(),
    ));
    report(&AgentEvent::Ready {
        agent: config.name.clone(),
        watch: format!("{}:{}", config.repository, config.tag),
        running: state.current.as_ref().map(|c| c.reference.clone()),
        pid: state.current.as_ref().map(|c| c.pid),
        listen: config.listen.map(|a| a.to_string()),
    });

    let subject = subjects::image_published(&config.repository);
    bus.kiln_stream().await?;
    // Tasks read the subjects all the time, so the consumers are polled while a deploy blocks.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let reader = tokio::spawn(watch(bus.clone(), subject.clone(), tx));
    let (order_tx, mut orders) = tokio::sync::mpsc::unbounded_channel();
    let order_reader = tokio::spawn(watch(
        bus.clone(),
        subjects::agent_deploy(&config.name),
        order_tx,
    ));
    let (revoked_tx, mut revocations) = tokio::sync::mpsc::unbounded_channel();
    let revoked_reader = tokio::spawn(watch(
        bus.clone(),
        subjects::image_revoked(&config.repository),
        revoked_tx,
    ));
    let kit = Kit {
        config: config.clone(),
        trust: trust.clone(),
        verifiers: verifiers.clone(),
        backend: backend.clone(),
    };
    let mut checks = tokio::time::interval(if config.health_interval.is_zero() {
        Duration::from_secs(86_400 * 365)
    } else {
        config.health_interval
    });
    checks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    checks.tick().await;
    let mut health = HealthWatch::default();
    tokio::pin!(shutdown);
    loop {
        let next = tokio::select! {
            _ = &mut shutdown => break,
            _ = checks.tick(), if !config.health_interval.is_zero() => {
                let Some(cur) = state.current.clone() else { continue };
                if health.digest.as_deref() != Some(cur.digest.as_str()) {
                    health = HealthWatch { digest: Some(cur.digest.clone()), ..HealthWatch::default() };
                }
                if health.given_up {
                    continue;
                }
                let result = tokio::task::spawn_blocking(move || check_health(&cur)).await?;
                match result {
                    Ok(()) => {
                        if health.failures > 0 {
                            tracing::info!("healthy again after {} failed check(s)", health.failures);
                            set_status(Status::of(&state, None));
                        }
                        health.failures = 0;
                        continue;
                    }
                    Err(why) => {
                        health.failures += 1;
                        tracing::warn!("health check {} of {}: {why}", health.failures, config.health_retries);
                        health.why = why;
                        let mut s = Status::of(&state, None);
                        s.failing = Some(health.why.clone());
                        set_status(s);
                        if health.failures < config.health_retries {
                            continue;
                        }
                    }
                }
                let mut w = std::mem::take(&mut health);
                let (st, (w, outcome)) = kit
                    .act(state, move |k, st| {
                        let o = heal(&k.config, &k.trust, &k.verifiers, st, &mut w, &k.backend)?;
                        Ok((w, o))
                    })
                    .await?;
                state = st;
                health = w;
                set_status(Status::of(&state, None));
                if let Some(o) = &outcome {
                    announce(bus, o, &report).await;
                }
                continue;
            }
            m = rx.recv() => m,
            r = revocations.recv() => {
                let Some(r) = r else { break };
                let revoked: ImageRevoked = match crate::bus::decode(&r.payload) {
                    Ok(v) => v,
                    Err(e) => {
                        tracing::warn!(
                            "ignoring a message on {}: {}",
                            r.subject,
                            crate::error::Chain(&e)
                        );
                        continue;
                    }
                };
                let runs_it = state.current.as_ref().is_some_and(|c| c.digest == revoked.digest);
                if !runs_it || revoked.repository != config.repository {
                    continue;
                }
                tracing::warn!("{} was revoked ({}); going back", revoked.reference, revoked.reason);
                set_status(Status::of(&state, state.previous.clone()));
                let (st, outcome) = kit
                    .act(state, move |k, st| {
                        go_back(&k.config, &k.trust, &k.verifiers, st, &revoked, &k.backend)
                    })
                    .await?;
                state = st;
                set_status(Status::of(&state, None));
                if let Some(o) = &outcome {
                    announce(bus, o, &report).await;
                }
                continue;
            }
            o = orders.recv() => {
                let Some(o) = o else { break };
                let order: DeployOrder = match crate::bus::decode(&o.payload) {
                    Ok(v) => v,
                    Err(e) => {
                        tracing::warn!(
                            "ignoring a message on {}: {}",
                            o.subject,
                            crate::error::Chain(&e)
                        );
                        continue;
                    }
                };
                if order.agent != config.name || !wanted(bus, &order).await {
                    continue;
                }
                set_status(Status::of(&state, Some(order.image.reference.clone())));
                let (st, outcome) = kit
                    .act(state, move |k, st| {
                        obey(&k.config, &k.trust, &k.verifiers, st, &order, &k.backend)
                    })
                    .await?;
                state = st;
                set_status(Status::of(&state, None));
                announce(bus, &outcome, &report).await;
                continue;
            }
        };
        let Some(m) = next else { break };
        let received = Instant::now();
        let msg: ImagePublished = match crate::bus::decode(&m.payload) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(
                    "ignoring a message on {}: {}",
                    m.subject,
                    crate::error::Chain(&e)
                );
                continue;
            }
        };
        if !announces(&msg, &config.repository, &config.tag) {
            continue;
        }
        let running = state.current.as_ref().map(|c| c.digest.as_str());
        let sequence = m.info().ok().map(|i| i.stream_sequence);
        if running == Some(msg.digest.as_str())
            || state.last_handled.as_deref() == Some(msg.digest.as_str())
            || (sequence.is_some() && state.refused_sequence == sequence)
        {
            tracing::info!("{} was handled already", msg.reference);
            continue;
        }
        tracing::info!("deploying {}", msg.reference);
        set_status(Status::of(&state, Some(msg.reference.clone())));
        let (st, outcome) = kit
            .act(state, move |k, st| {
                let o = deploy(
                    &k.config,
                    &k.trust,
                    &k.verifiers,
                    st,
                    &msg,
                    received,
                    &k.backend,
                )?;
                // Deployed or rolled back: `deploy` marked the digest handled. Refused without
                // booting: only this message is, so a restart does not act on it again.
                if st.last_handled.as_deref() != Some(msg.digest.as_str()) {
                    st.refused_sequence = sequence;
                }
                Ok(o)
            })
            .await?;
        state = st;
        set_status(Status::of(&state, None));
        announce(bus, &outcome, &report).await;
    }
    reader.abort();
    order_reader.abort();
    revoked_reader.abort();
    beats.abort();
    Ok(())
}

/// The running image was revoked (blocking): deploy the one that ran before it, as a new
/// image (pulled and checked again: a revoked or unsigned one is refused), and report with the
/// revocation as the cause. Without an image to go back to, the VM keeps running and the
/// failure says so. The announcement is only a claim: the revocation stored in the registry
/// is the record, and without it nothing is done (`None`).
fn go_back(
    config: &AgentConfig,
    trust: &VerifyingKey,
    verifiers: &[VerifyingKey],
    state: &mut AgentState,
    revoked: &ImageRevoked,
    backend: &proxy::Backend,
) -> Result<Option<Deployed>, AgentError> {
    let image = format!("{}@{}", config.repository, revoked.digest);
    match store::revocation(&image, &config.store) {
        Ok(Some(_)) => {}
        Ok(None) => {
            tracing::warn!(
                "{image} was announced as revoked, but its registry holds no revocation for it; ignored"
            );
            return Ok(None);
        }
        Err(e) => {
            tracing::warn!(
                "cannot confirm the revocation of {image} with its registry ({}); ignored",
                crate::error::Chain(&e)
            );
            return Ok(None);
        }
    }
    let cause = format!("revoked {}: {}", revoked.digest, revoked.reason);
    let application = state
        .current
        .as_ref()
        .map_or_else(|| config.name.clone(), |c| c.application.clone());
    let previous = state
        .previous
        .clone()
        .filter(|p| reference_digest(p) != revoked.digest && p.contains('@'));
    let Some(previous) = previous else {
        let msg = crate::rollout::announcement_of(
            &revoked.repository,
            &revoked.reference,
            &revoked.digest,
        );
        return Ok(Some(failed(
            config,
            &msg,
            &application,
            ErrorKind::Verification,
            format!("{cause}; there is no earlier image to go back to, so it keeps running"),
            state,
            false,
        )));
    };
    let msg = crate::rollout::announcement_of(
        &revoked.repository,
        &previous,
        reference_digest(&previous),
    );
    let mut outcome = deploy(
        config,
        trust,
        verifiers,
        state,
        &msg,
        Instant::now(),
        backend,
    )?;
    state.last_handled = Some(revoked.digest.clone());
    match &mut outcome {
        Deployed::Completed(c) => c.cause = Some(cause),
        Deployed::Failed(f) => {
            f.error.message = format!("{cause}; going back failed: {}", f.error.message)
        }
    }
    Ok(Some(outcome))
}

/// Whether the rollout that sent `order` still waits for it: an order read again after a
/// restart, or one whose rollout was aborted or moved on, is not acted on. When the bucket
/// cannot be read, the order is.
async fn wanted(bus: &Bus, order: &DeployOrder) -> bool {
    let found = match crate::bus::rollouts::Rollouts::open_existing(bus).await {
        Ok(Some(r)) => r.get(&order.rollout).await,
        Ok(None) => Ok(None),
        Err(e) => Err(e),
    };
    match found {
        Ok(Some((r, _))) => {
            let waiting = r.state == crate::bus::RolloutState::Running
                && r.hosts.iter().any(|h| {
                    h.agent == order.agent
                        && h.state == crate::bus::HostState::Ordered
                        && h.order.as_ref() == Some(&order.order)
                });
            if !waiting {
                tracing::info!(
                    "order {} is not awaited by rollout {} ({}); ignored",
                    order.order,
                    r.id,
                    r.state.name()
                );
            }
            waiting
        }
        Ok(None) => {
            tracing::info!(
                "order {}: rollout {} is unknown; ignored",
                order.order,
                order.rollout
            );
            false
        }
        Err(e) => {
            tracing::warn!(
                "cannot read rollout {} (acting on order {}): {}",
                order.rollout,
                order.order,
                crate::error::Chain(&e)
            );
            true
        }
    }
}

/// Act on a rollout order (blocking): deploy its image as an announcement of the watched tag
/// would be, and answer with the order's id. An order acted on before, or for the image that
/// runs, is answered from what runs without deploying anything.
fn obey(
    config: &AgentConfig,
    trust: &VerifyingKey,
    verifiers: &[VerifyingKey],
    state: &mut AgentState,
    order: &DeployOrder,
    backend: &proxy::Backend,
) -> Result<Deployed, AgentError> {
    let msg = &order.image;
    let application = config
        .repository
        .rsplit('/')
        .next()
        .unwrap_or(&config.repository)
        .to_string();
    let running = state.current.clone();
    let mut outcome = if msg.repository != config.repository {
        failed(
            config,
            msg,
            &application,
            ErrorKind::InvalidMessage,
            format!(
                "order {} is for {}, but this agent runs {}",
                order.order, msg.repository, config.repository
            ),
            state,
            false,
        )
    } else if let Some(c) = running.as_ref().filter(|c| c.digest == msg.digest) {
        tracing::info!("order {}: {} runs already", order.order, c.reference);
        Deployed::Completed(DeployCompleted {
            v: VERSION,
            agent: config.name.clone(),
            build: c.build.clone(),
            application: c.application.clone(),
            reference: c.reference.clone(),
            previous: state.previous.clone(),
            vm: vm_json(c, None),
            order: None,
            cause: None,
            pull: None,
            time: EventTime::now(),
        })
    } else if state.answered.iter().any(|o| o == &order.order) {
        failed(
            config,
            msg,
            &application,
            ErrorKind::Verification,
            format!(
                "order {} was acted on already and {} did not stay",
                order.order, msg.reference
            ),
            state,
            true,
        )
    } else {
        tracing::info!("order {}: deploying {}", order.order, msg.reference);
        deploy(
            config,
            trust,
            verifiers,
            state,
            msg,
            Instant::now(),
            backend,
        )?
    };
    state.answer(&order.order);
    match &mut outcome {
        Deployed::Completed(c) => c.order = Some(order.order.clone()),
        Deployed::Failed(f) => f.order = Some(order.order.clone()),
    }
    Ok(outcome)
}

/// What acting on the state needs besides it, shared with the blocking threads that act.
#[derive(Clone)]
struct Kit {
    config: AgentConfig,
    trust: VerifyingKey,
    verifiers: Vec<VerifyingKey>,
    backend: proxy::Backend,
}

impl Kit {
    /// Run `act` on `state` on a blocking thread (pulls, boots and health checks block), then
    /// save the state; both come back.
    async fn act<T: Send + 'static>(
        &self,
        mut state: AgentState,
        act: impl FnOnce(&Kit, &mut AgentState) -> Result<T, AgentError> + Send + 'static,
    ) -> Result<(AgentState, T), AgentError> {
        let kit = self.clone();
        blocking::<_, AgentError>(move || {
            let out = act(&kit, &mut state)?;
            state.save(&kit.config.state_dir)?;
            Ok((state, out))
        })
        .await
    }
}

/// What the agent's heartbeat says, shared by the deploy loop (which changes it) and the
/// heartbeat task (which sends it).
#[derive(Debug, Clone, Default)]
struct Status {
    deploying: Option<String>,
    /// Why the running VM failed its last health check, while it does.
    failing: Option<String>,
    current: Option<VmRecord>,
    previous: Option<String>,
}

impl Status {
    fn of(state: &AgentState, deploying: Option<String>) -> Status {
        Status {
            deploying,
            failing: None,
            current: state.current.clone(),
            previous: state.previous.clone(),
        }
    }
}

/// The heartbeat `status` makes now: a VM whose QEMU is gone is `unhealthy`.
fn heartbeat(config: &AgentConfig, status: &Status) -> crate::bus::AgentHeartbeat {
    use crate::bus::AgentHealth;
    let now = crate::time::now_ms() as i64;
    let vm = status.current.as_ref();
    let alive = vm.is_some_and(|c| crate::home::process_alive(c.pid));
    let health = match (&status.deploying, vm) {
        (Some(_), _) => AgentHealth::Deploying,
        (None, None) => AgentHealth::Idle,
        (None, Some(_)) if alive && status.failing.is_none() => AgentHealth::Healthy,
        (None, Some(_)) => AgentHealth::Unhealthy,
    };
    let mut groups = config.groups.clone();
    groups.sort();
    groups.dedup();
    crate::bus::AgentHeartbeat {
        v: VERSION,
        agent: config.name.clone(),
        groups,
        watch: format!("{}:{}", config.repository, config.tag),
        health,
        running: vm.map(|c| c.reference.clone()),
        digest: vm.map(|c| c.digest.clone()),
        previous: status.previous.clone(),
        deploying: status.deploying.clone(),
        pid: vm.map(|c| c.pid),
        uptime_s: vm
            .and_then(|c| crate::time::parse_rfc3339(&c.since))
            .map(|since| (now.saturating_sub(since).max(0) / 1000) as u64),
        listen: config.listen.map(|a| a.to_string()),
        kiln_version: env!("CARGO_PKG_VERSION").to_string(),
        interval_s: config.heartbeat.as_secs().max(1),
        sent_ms: now,
        time: EventTime::now(),
    }
}

/// Record the agent's heartbeat every `config.heartbeat` and at once when `changed` fires; put
/// it on the stream too when its health or running image changed. A bucket that cannot be
/// opened or written (no worker made it yet, no permission) is retried at the next beat.
async fn send_heartbeats(
    bus: Bus,
    config: AgentConfig,
    status: std::sync::Arc<std::sync::Mutex<Status>>,
    changed: std::sync::Arc<tokio::sync::Notify>,
) {
    let mut inventory: Option<crate::bus::agents::Inventory> = None;
    let mut announced: Option<(crate::bus::AgentHealth, Option<String>)> = None;
    loop {
        let snapshot = status.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let hb = heartbeat(&config, &snapshot);
        if inventory.is_none() {
            // Made by the workers; made here only when missing (an agent may not be allowed to).
            let opened = match crate::bus::agents::Inventory::open_existing(&bus).await {
                Ok(Some(i)) => Ok(i),
                Ok(None) => crate::bus::agents::Inventory::open(&bus).await,
                Err(e) => Err(e),
            };
            match opened {
                Ok(i) => inventory = Some(i),
                Err(e) => tracing::warn!(
                    "cannot open the kiln-agents bucket (retrying): {}",
                    crate::error::Chain(&e)
                ),
            }
        }
        if let Some(inv) = &inventory {
            let key = (hb.health, hb.digest.clone());
            let announce = announced.as_ref() != Some(&key);
            match inv.beat(&hb, announce).await {
                Ok(()) => announced = Some(key),
                Err(e) => {
                    tracing::warn!("cannot record the heartbeat: {}", crate::error::Chain(&e))
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(config.heartbeat) => {}
            _ = changed.notified() => {}
        }
    }
}

/// How long the watch may see nothing before it re-creates its consumer (an ordered consumer
/// that lost its server-side state can stay silent instead of failing).
const WATCH_IDLE: Duration = Duration::from_secs(10);

/// Send every message on `subject` to `tx`: first the last one stored, then each new one, in
/// stream order, without gaps or repeats across consumer re-creations.
async fn watch(
    bus: Bus,
    subject: String,
    tx: tokio::sync::mpsc::UnboundedSender<async_nats::jetstream::Message>,
) {
    use async_nats::jetstream::consumer::DeliverPolicy;
    let mut last: Option<u64> = None;
    loop {
        let deliver_policy = match last {
            None => DeliverPolicy::LastPerSubject,
            Some(seq) => DeliverPolicy::ByStartSequence {
                start_sequence: seq + 1,
            },
        };
        let mut floor = 0;
        let consumer = match bus.kiln_stream().await {
            Ok(mut stream) => {
                // Messages stored after this point are new: if the first consumer finds none
                // for the subject, the next one starts here.
                if let Ok(info) = stream.info().await {
                    floor = info.state.last_sequence;
                }
                stream
                    .create_consumer(bus.reader_config(subject.clone(), deliver_policy))
                    .await
            }
            Err(e) => {
                tracing::warn!("watching {subject}: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut messages = match consumer {
            Ok(c) => match c.messages().await {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!("watching {subject}: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
            Err(e) => {
                tracing::warn!("watching {subject}: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        loop {
            match tokio::time::timeout(WATCH_IDLE, messages.next()).await {
                Err(_) => break,
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    tracing::debug!("watching {subject}: {e}");
                    break;
                }
                Ok(Some(Ok(m))) => {
                    let seq = m.info().map(|i| i.stream_sequence).unwrap_or(0);
                    if last.is_some_and(|l| seq <= l) {
                        continue;
                    }
                    last = Some(seq);
                    if tx.send(m).is_err() {
                        return;
                    }
                }
            }
        }
        if last.is_none() {
            last = Some(floor);
        }
    }
}

/// The state directory's current VM, for tests and tools (`None` without one).
pub fn current_vm(state_dir: &Path) -> Result<Option<VmRecord>, AgentError> {
    Ok(AgentState::load(state_dir)?.current)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_print_as_objects_with_their_kind() {
        let ready = AgentEvent::Ready {
            agent: "hv-07".into(),
            watch: "127.0.0.1:5000/team/web:production".into(),
            running: None,
            pid: None,
            listen: Some("127.0.0.1:8080".into()),
        };
        let v = serde_json::to_value(&ready).unwrap();
        assert_eq!(v["kind"], "ready");
        assert_eq!(v["agent"], "hv-07");
        assert!(v["running"].is_null() && v.get("running").is_some(), "{v}");
        let failed = AgentEvent::Failed(DeployFailed {
            v: VERSION,
            agent: "hv-07".into(),
            build: None,
            application: "web".into(),
            reference: "r".into(),
            error: ErrorInfo::new(ErrorKind::Verification, "unsigned"),
            rolled_back: false,
            running: None,
            order: None,
            time: EventTime::now(),
        });
        let v = serde_json::to_value(&failed).unwrap();
        assert_eq!(v["kind"], "failed");
        assert_eq!(v["error"]["message"], "unsigned");
        assert_eq!(v["reference"], "r");
    }

    fn msg(reference: &str, tags: &[&str]) -> ImagePublished {
        ImagePublished {
            v: 1,
            build: "b".into(),
            repository: "127.0.0.1:5000/kiln/app".into(),
            reference: reference.into(),
            digest: format!("sha256:{}", "a".repeat(64)),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            signature: None,
            verification: Value::Null,
            promotion: None,
            time: EventTime::now(),
        }
    }

    #[test]
    fn watch_and_announcements() {
        assert_eq!(
            parse_watch("127.0.0.1:5000/kiln/app:prod").unwrap(),
            ("127.0.0.1:5000/kiln/app".into(), "prod".into())
        );
        assert!(parse_watch("127.0.0.1:5000/kiln/app").is_err());
        let repo = "127.0.0.1:5000/kiln/app";
        let m = msg(
            &format!("{repo}:prod@sha256:{}", "a".repeat(64)),
            &["prod", "v2"],
        );
        assert!(announces(&m, repo, "prod"));
        assert!(announces(&m, repo, "v2"));
        assert!(!announces(&m, repo, "staging"));
        assert!(!announces(&m, "127.0.0.1:5000/kiln/other", "prod"));
        assert_eq!(
            pull_reference(&m),
            format!("{repo}@sha256:{}", "a".repeat(64))
        );
    }

    #[test]
    fn health_comes_from_the_image_unless_overridden() {
        let mut config = AgentConfig {
            name: "hv".into(),
            repository: "r".into(),
            tag: "t".into(),
            trust: "k.pub".into(),
            trust_verifiers: Vec::new(),
            require: vec![store::Requirement::Signature],
            state_dir: "/s".into(),
            profile: "uefi".into(),
            profiles_dir: None,
            listen: None,
            health_serial: None,
            health_port: None,
            health_timeout: None,
            store: StoreOptions::default(),
            groups: Vec::new(),
            heartbeat: Duration::from_secs(10),
            health_interval: Duration::from_secs(10),
            health_retries: 3,
            keep: 2,
        };
        let ann = std::collections::BTreeMap::from([(
            store::ANN_DEPLOY.to_string(),
            r#"{"health_port":8080,"health_serial":"ready","verify_marker":"ok","health_timeout":30}"#.to_string(),
        )]);
        let h = health_for(&config, &ann).unwrap().health;
        assert_eq!(
            (h.serial.as_deref(), h.port, h.timeout_s),
            (Some("ready"), Some(8080), 30)
        );
        config.health_timeout = Some(5);
        config.health_port = Some(9000);
        let h = health_for(&config, &ann).unwrap().health;
        assert_eq!((h.port, h.timeout_s), (Some(9000), 5));
        config.health_port = None;
        let only_marker = std::collections::BTreeMap::from([(
            store::ANN_DEPLOY.to_string(),
            r#"{"verify_marker":"ok"}"#.to_string(),
        )]);
        let h = health_for(&config, &only_marker).unwrap().health;
        assert_eq!((h.serial.as_deref(), h.port), (Some("ok"), None));
        assert!(health_for(&config, &Default::default()).is_err());
    }
}
