//! Lost and damaged blobs: a stage record is only as good as the blobs it names. This module
//! owns what a runner does when a blob a stage needs is missing or no longer matches its digest
//! ([`StageError::Lost`]): find the stage that made it ([`producer_of`]), forget that stage's
//! records ([`forget_stage`]) and run it again, so a broken hit becomes a clean miss instead of a
//! permanent failure. It also runs one stage in process with its records held back until it
//! succeeded ([`run_stage`]), as `kiln build --no-bus` and the delivery of an image do.

use super::records::{HeldRecords, StageRecords};
use super::stages::{Handover, Need, ProgressSink, Ran, StageEnv, StageError, needs, produced};
use crate::bus;
use crate::digest::Digest256;

/// How many times one stage run recovers a lost blob before it gives up (each recovery runs one
/// earlier stage again; a second loss in a row means something keeps removing blobs).
pub const MAX_RECOVERIES: usize = 3;

/// The stage of this build whose outputs include `digest` (a blob it produced, or a file of a
/// Tree it produced), the latest first.
pub fn producer_of(env: &StageEnv, h: &Handover, digest: &Digest256) -> Option<bus::Stage> {
    let stages = || bus::Stage::ALL.iter().rev().copied();
    if let Some(stage) = stages().find(|s| produced(*s, h).iter().any(|n| n.digest() == digest)) {
        return Some(stage);
    }
    stages().find(|s| {
        produced(*s, h).iter().any(|n| {
            matches!(n, Need::Tree(_) | Need::KernelOf(_))
                && n.files(&env.blobs).is_ok_and(|f| f.contains(digest))
        })
    })
}

/// Remove the records of every step `stage` ran or found for this build (as its report lists
/// them), so that the stage runs again instead of finding outputs whose blobs are gone.
pub fn forget_stage(
    records: &dyn StageRecords,
    h: &Handover,
    stage: bus::Stage,
) -> std::io::Result<()> {
    if let Some(report) = h.reports.iter().rev().find(|r| r.stage == stage) {
        for step in &report.steps {
            records.remove(&step.step, &step.key)?;
        }
    }
    Ok(())
}

/// Why a lost blob must be made again, for the log and progress messages.
pub fn lost_note(digest: &Digest256, corrupt: bool, producer: bus::Stage) -> String {
    let why = if corrupt {
        "no longer matches its digest (damaged copy removed)"
    } else {
        "is gone from the blob store"
    };
    format!("blob {digest} {why}: forgetting the {producer} stage's records and running it again")
}

/// Make a lost blob again: forget the records of the stage that produced it and run that stage
/// once more (on a copy of `h`: its outputs are the same, the stages being reproducible).
pub fn remake(
    env: &StageEnv,
    records: &dyn StageRecords,
    h: &Handover,
    digest: &Digest256,
    corrupt: bool,
    progress: &dyn ProgressSink,
) -> Result<(), StageError> {
    let lost = || StageError::Lost {
        digest: digest.clone(),
        corrupt,
    };
    let producer = producer_of(env, h, digest).ok_or_else(lost)?;
    let note = lost_note(digest, corrupt, producer);
    tracing::warn!("{note}");
    progress.progress(super::stages::ProgressUpdate::new(None, note));
    forget_stage(records, h, producer).map_err(super::stages::io(format!(
        "forgetting the {producer} stage's records"
    )))?;
    let mut again = h.clone();
    run_stage(env, records, producer, &mut again, progress)?;
    if !produced(producer, &again)
        .iter()
        .any(|n| n.digest() == digest)
        && !env.blobs.contains(digest)
    {
        return Err(StageError::Io {
            what: format!(
                "the {producer} stage ran again but did not make blob {digest} again (its \
                 outputs differ from the recorded ones: is the stage reproducible?)"
            ),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
    }
    Ok(())
}

/// Run `stage` in this process: its records held back until it succeeded (a stage that fails
/// records nothing); a blob it needs that is missing or damaged is made again by the stage that
/// produced it (up to [`MAX_RECOVERIES`] times) and the stage retried. Blocking.
pub fn run_stage(
    env: &StageEnv,
    records: &dyn StageRecords,
    stage: bus::Stage,
    h: &mut Handover,
    progress: &dyn ProgressSink,
) -> Result<Ran, StageError> {
    let mut recoveries = 0;
    loop {
        let attempt = (|| {
            if let Some(n) = needs(env, stage, h)
                .into_iter()
                .find(|n| !env.blobs.contains(n.digest()))
            {
                return Err(StageError::Lost {
                    digest: n.digest().clone(),
                    corrupt: false,
                });
            }
            let held = HeldRecords::new(records);
            let mut next = h.clone();
            let ran = super::stages::run_one(env, &held, stage, &mut next, progress)?;
            held.commit().map_err(|source| StageError::Record {
                what: format!("the {stage} stage's results"),
                source,
            })?;
            Ok((next, ran))
        })();
        match attempt {
            Ok((next, ran)) => {
                *h = next;
                return Ok(ran);
            }
            Err(StageError::Lost { digest, corrupt }) if recoveries < MAX_RECOVERIES => {
                recoveries += 1;
                remake(env, records, h, &digest, corrupt, progress)?;
            }
            Err(e) => return Err(e),
        }
    }
}
