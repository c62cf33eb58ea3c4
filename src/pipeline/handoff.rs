//! The states stages hand on. A stage's `completed` message names the accumulated [`Handover`]
//! by digest (`state_digest`) instead of carrying it: the worker that publishes the message first
//! records the state under that digest, with the build and stage it belongs to, in the hand-over
//! records — the `kiln-states` KV bucket, or this process's memory for `kiln build`'s private
//! bus. The next stage (and `kiln build`, for its report) loads the state by digest and refuses a
//! digest that no worker recorded for that build and stage, or a record whose state does not hash
//! to it: the message is a trigger, not a proof.

use super::records::{StageRecords, stage_key};
use super::stages::Handover;
use crate::bus::Stage;
use crate::digest::Digest256;
use serde_json::{Value, json};

/// The record family of handed-on states (`state/<digest>`).
pub const STATE_RECORD: &str = "state";

/// The digest of a state as JSON (the same bytes whichever worker computes it: see the test).
pub fn state_digest(state: &Value) -> Digest256 {
    stage_key(STATE_RECORD, 1, state)
}

/// Why a named state cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error(
        "the {stage} stage's completed message for build {build} names a state ({digest}) that no kiln worker recorded for that build and stage: refused (a forged or altered message)"
    )]
    Unrecorded {
        build: String,
        stage: Stage,
        digest: String,
    },
    #[error(
        "the state recorded under {digest} for build {build} hashes to {actual}: the record is corrupt; build again"
    )]
    Corrupt {
        build: String,
        digest: Digest256,
        actual: Digest256,
    },
    #[error("the state recorded under {digest} for build {build} is not a build state")]
    Unreadable {
        build: String,
        digest: Digest256,
        #[source]
        source: serde_json::Error,
    },
    #[error("the state recorded under {digest} belongs to another build than {build}")]
    OtherBuild { build: String, digest: Digest256 },
    #[error("recording the state handed on by the {stage} stage of build {build}")]
    Record {
        build: String,
        stage: Stage,
        #[source]
        source: std::io::Error,
    },
}

impl HandoffError {
    /// A refusal of the message (final), not a failure to reach the records (retried).
    pub fn is_refusal(&self) -> bool {
        !matches!(self, HandoffError::Record { .. })
    }
}

/// Record `state` as handed on by `stage` of `build`; returns the digest its `completed` message
/// names.
pub fn record_state(
    records: &dyn StageRecords,
    build: &str,
    stage: Stage,
    state: &Handover,
) -> Result<Digest256, HandoffError> {
    let record_err = |source| HandoffError::Record {
        build: build.to_string(),
        stage,
        source,
    };
    let value = serde_json::to_value(state).map_err(|e| record_err(std::io::Error::other(e)))?;
    let digest = state_digest(&value);
    let record = json!({ "build": build, "stage": stage, "state": value });
    records
        .put(STATE_RECORD, &digest, &record)
        .map_err(record_err)?;
    Ok(digest)
}

/// The state that `stage` of `build` handed on under `digest` (as a `completed` message names
/// it), checked: recorded for that build and stage, hashing to the digest, of that build.
pub fn load_state(
    records: &dyn StageRecords,
    build: &str,
    stage: Stage,
    digest: &str,
) -> Result<Handover, HandoffError> {
    let record = Digest256::parse(digest).and_then(|key| records.get(STATE_RECORD, &key));
    state_from_record(record, build, stage, digest)
}

/// The KV key of the record of the state named `digest` (`state/sha256:<hex>`), for readers
/// that read the `kiln-states` bucket themselves; `None` for a digest that is not one.
pub fn record_key(digest: &str) -> Option<String> {
    Digest256::parse(digest).map(|d| format!("{STATE_RECORD}/{d}"))
}

/// [`load_state`]'s checks on a record already read (`None`: there is none).
pub fn state_from_record(
    record: Option<Value>,
    build: &str,
    stage: Stage,
    digest: &str,
) -> Result<Handover, HandoffError> {
    let unrecorded = || HandoffError::Unrecorded {
        build: build.to_string(),
        stage,
        digest: digest.chars().take(80).collect(),
    };
    let key = Digest256::parse(digest).ok_or_else(unrecorded)?;
    let record = record.ok_or_else(unrecorded)?;
    let agrees = record["build"].as_str() == Some(build)
        && record["stage"].as_str() == Some(stage.name())
        && record.get("state").is_some();
    if !agrees {
        return Err(unrecorded());
    }
    let value = &record["state"];
    let actual = state_digest(value);
    if actual != key {
        return Err(HandoffError::Corrupt {
            build: build.to_string(),
            digest: key,
            actual,
        });
    }
    let state: Handover =
        serde_json::from_value(value.clone()).map_err(|source| HandoffError::Unreadable {
            build: build.to_string(),
            digest: key.clone(),
            source,
        })?;
    if state.request.id.as_deref() != Some(build) {
        return Err(HandoffError::OtherBuild {
            build: build.to_string(),
            digest: key,
        });
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::{BuildRequest, RecipeSource};
    use crate::pipeline::records::MemoryRecords;

    fn state(id: &str) -> Handover {
        let mut req = BuildRequest::new(
            RecipeSource::Path {
                path: "recipes/minimal.yaml".into(),
            },
            "alice",
        );
        req.id = Some(id.into());
        Handover::new(req)
    }

    #[test]
    fn a_state_is_loaded_only_for_the_build_and_stage_that_recorded_it() {
        let records = MemoryRecords::default();
        let d = record_state(&records, "b1", Stage::Kernel, &state("b1")).unwrap();
        let got = load_state(&records, "b1", Stage::Kernel, d.as_str()).unwrap();
        assert_eq!(got.request.requester, "alice");
        // Another build, another stage, an unknown or malformed digest: refused.
        for (build, stage, digest) in [
            ("b2", Stage::Kernel, d.to_string()),
            ("b1", Stage::Disk, d.to_string()),
            ("b1", Stage::Kernel, format!("sha256:{}", "ab".repeat(32))),
            ("b1", Stage::Kernel, "sha256:zz".to_string()),
        ] {
            let e = load_state(&records, build, stage, &digest).unwrap_err();
            assert!(matches!(e, HandoffError::Unrecorded { .. }), "{e}");
            assert!(e.is_refusal());
            assert!(e.to_string().contains("no kiln worker recorded"), "{e}");
        }
        // A record whose state was altered after it was written.
        let mut altered = records.get(STATE_RECORD, &d).unwrap();
        altered["state"]["request"]["requester"] = "mallory".into();
        records.put(STATE_RECORD, &d, &altered).unwrap();
        let e = load_state(&records, "b1", Stage::Kernel, d.as_str()).unwrap_err();
        assert!(matches!(e, HandoffError::Corrupt { .. }), "{e}");
        // A state of another build recorded under this build's name.
        let d = record_state(&records, "b1", Stage::Render, &state("b9")).unwrap();
        let e = load_state(&records, "b1", Stage::Render, d.as_str()).unwrap_err();
        assert!(matches!(e, HandoffError::OtherBuild { .. }), "{e}");
    }

    #[test]
    fn a_state_keeps_its_digest_through_the_records() {
        // Stage times are floats: the digest a worker records must be the one the next worker
        // computes from the record it reads back as JSON.
        let mut floats = Vec::new();
        let mut x = 0.1f64;
        for i in 0..2000 {
            x = x * 1.000_123_7 + f64::from(i) * 1e-9;
            floats.push(x);
            floats.push(1.0 / (f64::from(i) + 3.0));
        }
        let state = json!({ "reports": floats, "n": u64::MAX, "neg": -1.5e-300 });
        let wire = serde_json::to_vec(&json!({ "state": state })).unwrap();
        let received: Value = serde_json::from_slice(&wire).unwrap();
        assert_eq!(state_digest(&state), state_digest(&received["state"]));
    }
}
