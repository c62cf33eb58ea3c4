//! The fleet's inventory: the `kiln-agents` KV bucket, one entry per agent (key: its sanitized
//! name) holding its latest [`AgentHeartbeat`], and how a reader judges an entry: an agent not
//! heard from for [`GONE_AFTER`] heartbeat intervals is `gone`, whatever it last said.

use super::blobs::{existing_kv, kv_bucket_stream};
use super::messages::{AgentHeartbeat, decode, encode};
use super::{Bus, BusError, RETENTION, nats_err, subjects};
use async_nats::jetstream::kv;
use futures::StreamExt;

/// The bucket's name.
pub const AGENT_BUCKET: &str = "kiln-agents";

/// Heartbeat intervals without a heartbeat after which an agent is `gone`.
pub const GONE_AFTER: u64 = 3;

/// Entries (agents) a listing reads at most: a bound on what a reader holds.
const MAX_AGENTS: usize = 10_000;

/// The backing stream (created by hand, as every kiln bucket: `create_key_value` fails against
/// NATS 2.9). An agent gone for the stream's retention drops out of the inventory.
fn stream_config() -> async_nats::jetstream::stream::Config {
    kv_bucket_stream(
        AGENT_BUCKET,
        "kiln agents: agent -> latest heartbeat",
        RETENTION,
    )
}

/// An agent as a listing shows it: its last heartbeat and the state judged from it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct AgentEntry {
    /// `idle`, `deploying`, `healthy`, `unhealthy`, or `gone`.
    pub state: &'static str,
    /// Seconds since its last heartbeat.
    pub last_seen_s: u64,
    #[serde(flatten)]
    pub heartbeat: AgentHeartbeat,
}

/// The state of an agent whose last heartbeat is `hb`, at `now_ms`.
pub fn judge(hb: &AgentHeartbeat, now_ms: i64) -> AgentEntry {
    let age_ms = now_ms.saturating_sub(hb.sent_ms).max(0) as u64;
    let gone = age_ms > GONE_AFTER * hb.interval_s.max(1) * 1000;
    AgentEntry {
        state: if gone { "gone" } else { hb.health.name() },
        last_seen_s: age_ms / 1000,
        heartbeat: hb.clone(),
    }
}

/// The `kiln-agents` bucket.
#[derive(Clone)]
pub struct Inventory {
    bus: Bus,
    kv: kv::Store,
}

impl std::fmt::Debug for Inventory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inventory").finish_non_exhaustive()
    }
}

impl Inventory {
    /// Create the bucket if missing and open it (workers and agents).
    pub async fn open(bus: &Bus) -> Result<Inventory, BusError> {
        bus.ensure_stream(stream_config()).await?;
        Self::open_existing(bus)
            .await?
            .ok_or_else(|| BusError::Nats {
                what: format!("open KV bucket {AGENT_BUCKET}"),
                message: "it is missing right after it was created".into(),
            })
    }

    /// Open the bucket without creating it; `None` when no agent or worker has made it yet.
    pub async fn open_existing(bus: &Bus) -> Result<Option<Inventory>, BusError> {
        Ok(existing_kv(bus, AGENT_BUCKET).await?.map(|kv| Inventory {
            bus: bus.clone(),
            kv,
        }))
    }

    /// Record `hb` as the agent's latest; with `announce`, also publish it on the stream
    /// (`kiln.agent.<agent>.heartbeat`: a change worth keeping in the history).
    pub async fn beat(&self, hb: &AgentHeartbeat, announce: bool) -> Result<(), BusError> {
        let key = subjects::sanitize_token(&hb.agent);
        self.kv
            .put(&key, encode(hb).into())
            .await
            .map_err(nats_err(format!("write {key} to {AGENT_BUCKET}")))?;
        if announce {
            self.bus.publish_raw(hb.subject(), encode(hb)).await?;
        }
        Ok(())
    }

    /// Every agent's latest heartbeat, judged at `now_ms`, sorted by name; entries that do not
    /// decode are skipped (with a warning).
    pub async fn list(&self, now_ms: i64) -> Result<Vec<AgentEntry>, BusError> {
        // A key written while the listing runs can be left out of it (its old entry is no
        // longer the last, its new one comes after the listing ended): two listings, merged.
        let mut names = std::collections::BTreeSet::new();
        for _ in 0..2 {
            let mut keys = self
                .kv
                .keys()
                .await
                .map_err(nats_err(format!("list {AGENT_BUCKET}")))?;
            while let Some(key) = keys.next().await {
                names.insert(key.map_err(nats_err(format!("list {AGENT_BUCKET}")))?);
                if names.len() > MAX_AGENTS {
                    break;
                }
            }
        }
        let mut out = Vec::new();
        for key in names {
            if out.len() >= MAX_AGENTS {
                tracing::warn!(
                    "{AGENT_BUCKET} has more than {MAX_AGENTS} agents: listing the first"
                );
                break;
            }
            let Some(value) = self
                .kv
                .get(&key)
                .await
                .map_err(nats_err(format!("read {key} from {AGENT_BUCKET}")))?
            else {
                continue;
            };
            match decode::<AgentHeartbeat>(&value) {
                Ok(hb) => out.push(judge(&hb, now_ms)),
                Err(e) => tracing::warn!("{AGENT_BUCKET} entry {key}: {e}"),
            }
        }
        out.sort_by(|a, b| a.heartbeat.agent.cmp(&b.heartbeat.agent));
        Ok(out)
    }
}

/// Whether `name` can be a group: 1 to 64 letters, digits, `-`, `_` or `.` (a subject token).
pub fn valid_group(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// The agents of `group` (all with `None`).
pub fn in_group(entries: Vec<AgentEntry>, group: Option<&str>) -> Vec<AgentEntry> {
    match group {
        None => entries,
        Some(g) => entries
            .into_iter()
            .filter(|e| e.heartbeat.groups.iter().any(|x| x == g))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::{AgentHealth, EventTime};

    fn hb(sent_ms: i64) -> AgentHeartbeat {
        AgentHeartbeat {
            v: 1,
            agent: "hv-01".into(),
            groups: vec!["web".into()],
            watch: "r:prod".into(),
            health: AgentHealth::Healthy,
            running: None,
            digest: None,
            previous: None,
            deploying: None,
            pid: None,
            uptime_s: None,
            listen: None,
            kiln_version: "0".into(),
            interval_s: 10,
            sent_ms,
            time: EventTime::now(),
        }
    }

    #[test]
    fn an_agent_silent_for_three_intervals_is_gone() {
        assert_eq!(judge(&hb(100_000), 125_000).state, "healthy");
        assert_eq!(judge(&hb(100_000), 130_000).state, "healthy");
        let e = judge(&hb(100_000), 130_001);
        assert_eq!((e.state, e.last_seen_s), ("gone", 30));
        // A clock behind the agent's is not "seen in the future".
        assert_eq!(judge(&hb(100_000), 90_000).last_seen_s, 0);
        let v = serde_json::to_value(judge(&hb(100_000), 101_000)).unwrap();
        assert_eq!(
            (v["state"].as_str(), v["agent"].as_str()),
            (Some("healthy"), Some("hv-01"))
        );
        assert_eq!(in_group(vec![judge(&hb(0), 0)], Some("db")).len(), 0);
        assert_eq!(in_group(vec![judge(&hb(0), 0)], Some("web")).len(), 1);
    }
}
