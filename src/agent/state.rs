//! The agent's state file (`<state-dir>/state.json`, written atomically): the VM that runs now,
//! the image that ran before it, and the last image the agent acted on. It is what lets a
//! restarted agent find and re-adopt its running VM instead of booting a second one.

use super::AgentError;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// How the agent decides that a VM is healthy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthSpec {
    /// A line on the serial console containing this text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// A guest TCP port (forwarded from the host's loopback) that must answer with some bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Seconds from starting QEMU.
    pub timeout_s: u64,
}

/// One VM the agent started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    /// Sequence number of the VM on this agent (its directory is `vm-<id>`).
    pub id: u64,
    /// `repo:tag@sha256:…` of the image it runs.
    pub reference: String,
    /// Manifest digest.
    pub digest: String,
    /// The build that produced the image, when the message said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<String>,
    pub application: String,
    /// The pulled, verified image (the overlay's backing file).
    pub image: PathBuf,
    /// The VM's directory: overlay, serial log, QMP socket, pidfile, UEFI variables.
    pub dir: PathBuf,
    pub overlay: PathBuf,
    pub serial_log: PathBuf,
    pub qmp: PathBuf,
    pub pid: u32,
    /// `127.0.0.1:<host_port>` is forwarded to `guest_port` in the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_port: Option<u16>,
    pub health: HealthSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// When it became healthy (RFC 3339).
    pub since: String,
}

/// Everything the agent remembers across restarts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentState {
    /// The VM that runs now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<VmRecord>,
    /// The reference that ran before `current`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<String>,
    /// Digest of the last image the agent booted (deployed, or rolled back from), so that a
    /// restart does not act on the same announcement twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_handled: Option<String>,
    /// Stream sequence of the last announcement the agent refused without booting (wrong
    /// registry, key or digest). A refusal is remembered per message, never per digest: a
    /// forged announcement of a digest cannot keep a later valid one of it from deploying.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused_sequence: Option<u64>,
    /// The next VM id.
    #[serde(default)]
    pub next_vm: u64,
    /// The last rollout orders acted on (newest last, at most [`ANSWERED`]): an order seen again
    /// is answered from what runs, not deployed again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub answered: Vec<String>,
}

/// Rollout orders remembered in [`AgentState::answered`].
pub const ANSWERED: usize = 32;

impl AgentState {
    /// Remember that `order` was acted on.
    pub fn answer(&mut self, order: &str) {
        self.answered.retain(|o| o != order);
        self.answered.push(order.to_string());
        let over = self.answered.len().saturating_sub(ANSWERED);
        self.answered.drain(..over);
    }
}

/// `<dir>/state.json`.
pub fn state_path(dir: &Path) -> PathBuf {
    dir.join("state.json")
}

impl AgentState {
    /// Read the state; a missing file is the empty state.
    pub fn load(dir: &Path) -> Result<AgentState, AgentError> {
        let path = state_path(dir);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| AgentError::State {
                path,
                reason: format!("{e} (move the file away to start with an empty state)"),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(AgentState::default()),
            Err(source) => Err(AgentError::Io {
                what: "read the agent state",
                path,
                source,
            }),
        }
    }

    /// Write the state atomically (temp file + rename).
    pub fn save(&self, dir: &Path) -> Result<(), AgentError> {
        let path = state_path(dir);
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| AgentError::State {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        crate::home::write_atomic(&path, &bytes).map_err(|source| AgentError::Io {
            what: "write the agent state",
            path,
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(AgentState::load(dir.path()).unwrap(), AgentState::default());
        let s = AgentState {
            current: Some(VmRecord {
                id: 3,
                reference: "127.0.0.1:5000/a:v1@sha256:00".into(),
                digest: "sha256:00".into(),
                build: Some("b1".into()),
                application: "a".into(),
                image: "/s/images/x.qcow2".into(),
                dir: "/s/vm-3".into(),
                overlay: "/s/vm-3/disk.qcow2".into(),
                serial_log: "/s/vm-3/serial.log".into(),
                qmp: "/s/vm-3/qmp.sock".into(),
                pid: 42,
                host_port: Some(40000),
                guest_port: Some(8080),
                health: HealthSpec {
                    serial: Some("ready".into()),
                    port: Some(8080),
                    timeout_s: 60,
                },
                memory_mib: None,
                cpus: None,
                since: "2026-11-26T00:00:00Z".into(),
            }),
            previous: None,
            last_handled: Some("sha256:00".into()),
            refused_sequence: Some(42),
            next_vm: 4,
            answered: Vec::new(),
        };
        let mut s = s;
        for i in 0..40 {
            s.answer(&format!("r.0.a.{i}"));
        }
        s.answer("r.0.a.39");
        assert_eq!(s.answered.len(), ANSWERED);
        assert_eq!(s.answered.last().map(String::as_str), Some("r.0.a.39"));
        assert_eq!(s.answered[0], "r.0.a.8");
        s.save(dir.path()).unwrap();
        assert_eq!(AgentState::load(dir.path()).unwrap(), s);
        std::fs::write(state_path(dir.path()), b"{").unwrap();
        let e = AgentState::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("state.json"), "{e}");
    }
}
