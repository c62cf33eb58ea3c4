//! Rollouts on the bus: the `kiln-rollouts` KV bucket (one entry per rollout, key: its id,
//! holding the latest [`Rollout`]), written only with compare-and-set so that two controllers
//! never both move one rollout; the history on `kiln.rollout.<id>.<event>`; and how waves are
//! planned from a group (pure, [`parse_waves`] and [`plan`]).

use super::blobs::{existing_kv, kv_bucket_stream};
use super::messages::{Rollout, decode, encode};
use super::{Bus, BusError, RETENTION, nats_err};
use async_nats::jetstream::kv;
use futures::StreamExt;

/// The bucket's name.
pub const ROLLOUT_BUCKET: &str = "kiln-rollouts";

/// Rollouts a listing reads at most.
const MAX_ROLLOUTS: usize = 10_000;
/// Waves a rollout may have.
pub const MAX_WAVES: usize = 100;

/// One wave's size as given: hosts, or a share of the group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaveSize {
    Hosts(usize),
    Percent(u32),
}

/// Parse `--waves 1,25%,100%`: each a number of hosts (≥ 1) or a percentage (1–100).
pub fn parse_waves(text: &str) -> Result<Vec<WaveSize>, String> {
    let mut out = Vec::new();
    for part in text.split(',') {
        let part = part.trim();
        let size = if let Some(p) = part.strip_suffix('%') {
            match p.parse::<u32>() {
                Ok(n) if (1..=100).contains(&n) => WaveSize::Percent(n),
                _ => return Err(format!("{part:?}: a share is 1% to 100%")),
            }
        } else {
            match part.parse::<usize>() {
                Ok(n) if n >= 1 => WaveSize::Hosts(n),
                _ => {
                    return Err(format!(
                        "{part:?}: a wave is a number of hosts (1 or more) or a share of the group (25%)"
                    ));
                }
            }
        };
        out.push(size);
    }
    if out.is_empty() || out.len() > MAX_WAVES {
        return Err(format!("give 1 to {MAX_WAVES} waves, e.g. 1,25%,100%"));
    }
    Ok(out)
}

/// Split `hosts` (in the order given) into waves: each wave takes its size (a share is of the
/// whole group, rounded up) from the hosts left; the last wave takes every host left. Empty
/// waves are dropped.
pub fn plan(hosts: &[String], waves: &[WaveSize]) -> Vec<Vec<String>> {
    let total = hosts.len();
    let mut rest = hosts;
    let mut out = Vec::new();
    for (i, w) in waves.iter().enumerate() {
        let n = if i + 1 == waves.len() {
            rest.len()
        } else {
            match *w {
                WaveSize::Hosts(n) => n,
                WaveSize::Percent(p) => (total * p as usize).div_ceil(100),
            }
            .min(rest.len())
        };
        if n > 0 {
            out.push(rest[..n].to_vec());
        }
        rest = &rest[n..];
    }
    out
}

/// The `kiln-rollouts` bucket.
#[derive(Clone)]
pub struct Rollouts {
    bus: Bus,
    kv: kv::Store,
}

impl std::fmt::Debug for Rollouts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rollouts").finish_non_exhaustive()
    }
}

impl Rollouts {
    /// Create the bucket if missing and open it.
    pub async fn open(bus: &Bus) -> Result<Rollouts, BusError> {
        bus.ensure_stream(kv_bucket_stream(
            ROLLOUT_BUCKET,
            "kiln rollouts: id -> latest state",
            RETENTION,
        ))
        .await?;
        let kv = bus
            .jetstream()
            .get_key_value(ROLLOUT_BUCKET)
            .await
            .map_err(nats_err(format!("open KV bucket {ROLLOUT_BUCKET}")))?;
        Ok(Rollouts {
            bus: bus.clone(),
            kv,
        })
    }

    /// Open the bucket without creating it: `None` until the first `kiln rollout` made it (so
    /// controllers and agents add nothing to a server that has no rollouts).
    pub async fn open_existing(bus: &Bus) -> Result<Option<Rollouts>, BusError> {
        Ok(existing_kv(bus, ROLLOUT_BUCKET).await?.map(|kv| Rollouts {
            bus: bus.clone(),
            kv,
        }))
    }

    /// Store a new rollout (fails if its id exists) and put it on the stream.
    pub async fn create(&self, r: &Rollout) -> Result<u64, BusError> {
        let revision = self
            .kv
            .create(&r.id, encode(r).into())
            .await
            .map_err(nats_err(format!(
                "create rollout {} in {ROLLOUT_BUCKET}",
                r.id
            )))?;
        self.bus.publish_raw(r.subject(), encode(r)).await?;
        Ok(revision)
    }

    /// The rollout `id` and its revision; `None` when there is none.
    pub async fn get(&self, id: &str) -> Result<Option<(Rollout, u64)>, BusError> {
        let what = || format!("read rollout {id} from {ROLLOUT_BUCKET}");
        let Some(entry) = self.kv.entry(id).await.map_err(nats_err(what()))? else {
            return Ok(None);
        };
        if entry.operation != kv::Operation::Put {
            return Ok(None);
        }
        let r = decode::<Rollout>(&entry.value).map_err(|e| BusError::Nats {
            what: what(),
            message: e.to_string(),
        })?;
        Ok(Some((r, entry.revision)))
    }

    /// Replace the rollout if it is still at `revision`: `Ok(None)` when someone else changed
    /// it first (nothing written). The change goes on the stream when `announce`.
    pub async fn update(
        &self,
        r: &Rollout,
        revision: u64,
        announce: bool,
    ) -> Result<Option<u64>, BusError> {
        match self.kv.update(&r.id, encode(r).into(), revision).await {
            Ok(rev) => {
                if announce {
                    self.bus.publish_raw(r.subject(), encode(r)).await?;
                }
                Ok(Some(rev))
            }
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(None),
            Err(e) => Err(nats_err(format!(
                "update rollout {} in {ROLLOUT_BUCKET}",
                r.id
            ))(e)),
        }
    }

    /// Every rollout with its revision, oldest first; entries that do not decode are skipped.
    pub async fn list(&self) -> Result<Vec<(Rollout, u64)>, BusError> {
        let mut keys = self
            .kv
            .keys()
            .await
            .map_err(nats_err(format!("list {ROLLOUT_BUCKET}")))?;
        let mut out = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(nats_err(format!("list {ROLLOUT_BUCKET}")))?;
            if out.len() >= MAX_ROLLOUTS {
                tracing::warn!("{ROLLOUT_BUCKET} has more than {MAX_ROLLOUTS} rollouts");
                break;
            }
            match self.get(&key).await {
                Ok(Some(x)) => out.push(x),
                Ok(None) => {}
                Err(e) => tracing::warn!("{}", crate::error::Chain(&e)),
            }
        }
        out.sort_by_key(|(r, _)| r.created_ms);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("hv-{i:02}")).collect()
    }

    #[test]
    fn waves_take_counts_and_shares_and_the_last_takes_the_rest() {
        let w = parse_waves("1,25%,100%").unwrap();
        assert_eq!(
            w,
            [
                WaveSize::Hosts(1),
                WaveSize::Percent(25),
                WaveSize::Percent(100)
            ]
        );
        let p = plan(&hosts(8), &w);
        assert_eq!(p.iter().map(Vec::len).collect::<Vec<_>>(), [1, 2, 5]);
        assert_eq!(p[0], ["hv-01"]);
        let p = plan(&hosts(3), &parse_waves("1,1,1").unwrap());
        assert_eq!(p, [vec!["hv-01"], vec!["hv-02"], vec!["hv-03"]]);
        // Fewer hosts than waves: no empty waves; more: the last wave takes them.
        assert_eq!(plan(&hosts(1), &parse_waves("1,1,1").unwrap()).len(), 1);
        assert_eq!(plan(&hosts(5), &parse_waves("1,1").unwrap())[1].len(), 4);
        assert!(plan(&[], &parse_waves("100%").unwrap()).is_empty());
        for bad in ["", "0", "0%", "101%", "x", "1,,2", "-1"] {
            assert!(parse_waves(bad).is_err(), "{bad:?}");
        }
    }
}
