//! What a build's messages say, for people and programs, read back from the `KILN` stream: one
//! line (or JSON object) per stage event (`kiln logs`, `kiln submit --follow`, `kiln build`),
//! and the list of recent builds (`kiln status`); each stage's latest state is
//! [`crate::bus::status`]. Pure functions over messages, so the HTTP front end shows the same.

pub use crate::bus::status::{ends_build, error_text, time_text};
use crate::bus::{self, BuildRequest, ErrorInfo, StageEvent, StoredMessage, subjects};
use serde::Serialize;
use serde_json::Value;

/// One stage event as a JSON object with its `kind` (started, progress, completed, failed),
/// without the accumulated `state` (large, and for the next stage only).
pub fn event_json(e: &StageEvent) -> Value {
    let mut v = match e {
        StageEvent::Started(m) => serde_json::to_value(m),
        StageEvent::Progress(m) => serde_json::to_value(m),
        StageEvent::Completed(m) => serde_json::to_value(m),
        StageEvent::Failed(m) => serde_json::to_value(m),
    }
    .unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.insert("kind".into(), e.kind().name().into());
        o.remove("state");
    }
    v
}

/// One human line for a stage event: time, stage, event, then worker, cache, duration, progress
/// or the error (with `file:line:column` and help on an indented second line).
pub fn event_line(e: &StageEvent) -> String {
    let (time, rest) = match e {
        StageEvent::Started(s) => (
            &s.time,
            match s.attempt {
                Some(n) if n > 1 => format!("on {} (attempt {n})", s.worker),
                _ => format!("on {}", s.worker),
            },
        ),
        StageEvent::Progress(p) => (
            &p.time,
            format!(
                "{}{} on {}",
                p.fraction
                    .map(|f| format!("{:>3.0}% ", f * 100.0))
                    .unwrap_or_default(),
                p.message.as_deref().unwrap_or(""),
                p.worker
            ),
        ),
        StageEvent::Completed(c) => (
            &c.time,
            format!(
                "{} {:.2} s on {}",
                c.cache,
                c.duration_ms as f64 / 1000.0,
                c.worker
            ),
        ),
        StageEvent::Failed(f) => (
            &f.time,
            format!(
                "on {}{}: {}",
                f.worker,
                f.attempts
                    .filter(|n| *n > 1)
                    .map(|n| format!(" after {n} attempts"))
                    .unwrap_or_default(),
                error_text(&f.error)
            ),
        ),
    };
    format!(
        "{} {:>7} {:<9} {rest}",
        time_text(time),
        e.stage().name(),
        e.kind().name()
    )
}

/// Where a build is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BuildPhase {
    /// Requested; no stage has started.
    Queued,
    Running,
    /// The last stage of the pipeline, publish, completed.
    Completed,
    Failed,
}

impl BuildPhase {
    pub fn name(self) -> &'static str {
        match self {
            BuildPhase::Queued => "queued",
            BuildPhase::Running => "running",
            BuildPhase::Completed => "completed",
            BuildPhase::Failed => "failed",
        }
    }
}

/// One build in the list of recent builds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BuildSummary {
    pub id: String,
    /// The recipe: its path, inline name, or `git-url ref path`.
    pub recipe: Option<String>,
    pub requester: Option<String>,
    pub state: BuildPhase,
    /// The stage running now, or the last one that ran.
    pub stage: Option<bus::Stage>,
    /// When it was requested (or first seen), Unix milliseconds.
    pub requested_ms: u64,
    /// When its last message was stored, Unix milliseconds.
    pub updated_ms: u64,
    /// The failure, for a failed build.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
}

fn recipe_text(r: &BuildRequest) -> String {
    match &r.recipe {
        bus::RecipeSource::Path { path } => path.display().to_string(),
        bus::RecipeSource::Inline { name, .. } => format!("{name} (inline)"),
        bus::RecipeSource::Git { git } => format!(
            "{} {} {}",
            crate::net::redact(&git.url),
            git.git_ref,
            git.path
        ),
    }
}

/// The builds that `kiln.build.>` messages tell of, most recently requested first, at most
/// `limit`. A request without an id is matched to the id the source stage assigns it.
pub fn summarise_builds(messages: &[StoredMessage], limit: usize) -> Vec<BuildSummary> {
    let mut builds: Vec<BuildSummary> = Vec::new();
    let find = |builds: &mut Vec<BuildSummary>, id: &str, at: u64| -> usize {
        match builds.iter().position(|b| b.id == id) {
            Some(i) => i,
            None => {
                builds.push(BuildSummary {
                    id: id.to_string(),
                    recipe: None,
                    requester: None,
                    state: BuildPhase::Queued,
                    stage: None,
                    requested_ms: at,
                    updated_ms: at,
                    error: None,
                });
                builds.len() - 1
            }
        }
    };
    for m in messages {
        if m.subject == subjects::BUILD_REQUESTED {
            let Ok(req) = bus::decode::<BuildRequest>(&m.payload) else {
                continue;
            };
            let id = req
                .id
                .clone()
                .unwrap_or_else(|| super::worker::assigned_build_id(m.published_ms, m.sequence));
            let i = find(&mut builds, &id, m.published_ms);
            let b = &mut builds[i];
            b.recipe = Some(recipe_text(&req));
            b.requester = Some(req.requester.clone());
            b.requested_ms = b.requested_ms.min(m.published_ms);
            continue;
        }
        let Some(s) = subjects::parse_stage_subject(&m.subject) else {
            continue;
        };
        let Ok(event) = StageEvent::decode(s.kind, &m.payload) else {
            continue;
        };
        let i = find(&mut builds, event.build(), m.published_ms);
        let b = &mut builds[i];
        b.updated_ms = b.updated_ms.max(m.published_ms);
        if b.state == BuildPhase::Failed {
            continue;
        }
        b.stage = Some(event.stage());
        match &event {
            StageEvent::Failed(f) => {
                b.state = BuildPhase::Failed;
                b.error = Some(f.error.clone());
            }
            StageEvent::Completed(c) if c.stage == bus::Stage::Publish => {
                b.state = BuildPhase::Completed;
            }
            _ => b.state = BuildPhase::Running,
        }
    }
    builds.sort_by(|a, b| {
        b.requested_ms
            .cmp(&a.requested_ms)
            .then_with(|| b.id.cmp(&a.id))
    });
    builds.truncate(limit);
    builds
}

/// How long ago, for people: `42s`, `5m`, `3h`, `2d`.
pub fn age_text(ms: u64, now_ms: u64) -> String {
    let s = now_ms.saturating_sub(ms) / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86_400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::{CacheStatus, EventTime};
    use crate::bus::{ErrorKind, StageCompleted, StageFailed, StageStarted, encode};

    fn stored(seq: u64, subject: String, payload: Vec<u8>) -> StoredMessage {
        StoredMessage {
            sequence: seq,
            subject,
            published_ms: 1_000 * seq,
            payload: payload.into(),
        }
    }

    #[test]
    fn builds_are_summarised_newest_first_with_their_state() {
        let mut req = BuildRequest::new(
            bus::RecipeSource::Path {
                path: "/r/minimal.yaml".into(),
            },
            "alice",
        );
        req.id = Some("b1".into());
        let started = StageEvent::Started(StageStarted {
            v: 1,
            build: "b1".into(),
            stage: bus::Stage::Render,
            worker: "w".into(),
            time: EventTime::UnixMs(2_000),
            attempt: Some(1),
        });
        let mut error = ErrorInfo::new(ErrorKind::Recipe, "unknown field `kernal`");
        error.file = Some("/r/minimal.yaml".into());
        error.line = Some(3);
        error.column = Some(1);
        error.help = Some("did you mean `kernel`?".into());
        let failed = StageEvent::Failed(StageFailed {
            v: 1,
            build: "b1".into(),
            stage: bus::Stage::Render,
            worker: "w".into(),
            time: EventTime::UnixMs(3_000),
            error,
            attempts: Some(1),
            duration_ms: Some(4),
        });
        // A request without an id, then its source stage's completion under the assigned id.
        let anonymous = BuildRequest::new(
            bus::RecipeSource::Path {
                path: "/r/other.yaml".into(),
            },
            "ci",
        );
        let assigned = crate::pipeline::worker::assigned_build_id(4_000, 4);
        let done = StageEvent::Completed(StageCompleted {
            v: 1,
            build: assigned.clone(),
            stage: bus::Stage::Source,
            worker: "w".into(),
            time: EventTime::UnixMs(5_000),
            outputs: serde_json::json!({}),
            state: serde_json::json!({}),
            cache: CacheStatus::Miss,
            duration_ms: 1,
        });
        let messages = vec![
            stored(1, subjects::BUILD_REQUESTED.into(), encode(&req)),
            stored(2, started.subject(), started.encode()),
            stored(3, failed.subject(), failed.encode()),
            stored(4, subjects::BUILD_REQUESTED.into(), encode(&anonymous)),
            stored(5, done.subject(), done.encode()),
        ];
        let list = summarise_builds(&messages, 10);
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].id, assigned);
        assert_eq!(list[0].state, BuildPhase::Running);
        assert_eq!(list[0].requester.as_deref(), Some("ci"));
        assert_eq!(list[1].id, "b1");
        assert_eq!(list[1].state, BuildPhase::Failed);
        assert_eq!(list[1].stage, Some(bus::Stage::Render));
        assert_eq!(list[1].recipe.as_deref(), Some("/r/minimal.yaml"));
        assert_eq!(summarise_builds(&messages, 1).len(), 1);

        let line = event_line(&failed);
        assert!(
            line.contains("render") && line.contains("/r/minimal.yaml:3:1"),
            "{line}"
        );
        assert!(line.contains("help: did you mean `kernel`?"), "{line}");
        assert!(event_line(&started).starts_with("1970-01-01T00:00:02.000Z  render started"));
        assert_eq!(age_text(0, 90_000), "1m");
    }
}
