//! A build's status summarised from its events as read back from the stream: per stage the
//! state, worker, times, cache hit/miss, duration and error, and whether the build has ended.
//! `kiln status` and the HTTP API's `GET /v1/builds/{id}` both print this, so they say the same.

use super::RecordedEvent;
use super::messages::{CacheStatus, ErrorInfo, EventTime, StageEvent};
use super::subjects::Stage;
use serde::Serialize;

/// Where a stage is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StageState {
    Started,
    Completed,
    Failed,
}

/// Where a build is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BuildState {
    /// Accepted but no stage has started yet.
    Queued,
    /// A stage is working or the next one has not started yet.
    Running,
    /// The last stage completed.
    Completed,
    /// A stage failed; the build stops there.
    Failed,
}

/// One stage of a build, from its latest events.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StageStatus {
    pub stage: Stage,
    pub status: StageState,
    /// When the stage started (its latest attempt).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started: Option<EventTime>,
    /// When it completed or failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time: Option<EventTime>,
    /// The worker of the latest event.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// How many times the stage started (more than 1: a worker failed or was lost and it was
    /// redelivered).
    pub attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// The latest progress line while the stage runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    /// How far the running stage got (0–1), when it says.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fraction: Option<f64>,
    /// Why it failed (with file:line:column for recipe errors).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
}

/// A build as its events in the stream tell it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BuildStatus {
    pub build: String,
    pub state: BuildState,
    /// The recipe's git commit, when the recipe came from git (the source stage's output).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    /// The stages that have events, in pipeline order.
    pub stages: Vec<StageStatus>,
}

/// True when `event` is the last one of its build: a `failed` (only published once no retry is
/// left) or the `completed` of the last stage, publish (which completes as skipped when the
/// recipe or the workers have nowhere to publish).
pub fn ends_build(event: &StageEvent) -> bool {
    match event {
        StageEvent::Failed(_) => true,
        StageEvent::Completed(c) => c.stage == Stage::Publish,
        _ => false,
    }
}

impl BuildStatus {
    /// Summarise the events of `build` in stream order. Events that could not be read are
    /// skipped. No events: the build is `queued` with no stages.
    pub fn from_events(build: &str, events: &[RecordedEvent]) -> BuildStatus {
        let mut stages: Vec<StageStatus> = Vec::new();
        let mut state = if events.is_empty() {
            BuildState::Queued
        } else {
            BuildState::Running
        };
        let mut commit = None;
        for ev in events {
            let Ok(event) = &ev.event else { continue };
            let stage = event.stage();
            let i = match stages.iter().position(|s| s.stage == stage) {
                Some(i) => i,
                None => {
                    stages.push(StageStatus {
                        stage,
                        status: StageState::Started,
                        started: None,
                        time: None,
                        worker: None,
                        attempts: 0,
                        cache: None,
                        duration_ms: None,
                        progress: None,
                        fraction: None,
                        error: None,
                    });
                    stages.len() - 1
                }
            };
            let row = &mut stages[i];
            match event {
                StageEvent::Started(s) => {
                    row.status = StageState::Started;
                    row.started = Some(s.time.clone());
                    row.worker = Some(s.worker.clone());
                    row.attempts += 1;
                    row.error = None;
                }
                StageEvent::Progress(p) => {
                    if p.message.is_some() {
                        row.progress = p.message.clone();
                    }
                    if p.fraction.is_some() {
                        row.fraction = p.fraction;
                    }
                }
                StageEvent::Completed(c) => {
                    row.status = StageState::Completed;
                    row.time = Some(c.time.clone());
                    row.worker = Some(c.worker.clone());
                    row.cache = Some(c.cache);
                    row.duration_ms = Some(c.duration_ms);
                    row.progress = None;
                    row.fraction = None;
                    if c.stage == Stage::Source
                        && let Some(id) = c.outputs.get("commit").and_then(|v| v.as_str())
                    {
                        commit = Some(id.to_string());
                    }
                }
                StageEvent::Failed(f) => {
                    row.status = StageState::Failed;
                    row.time = Some(f.time.clone());
                    row.worker = Some(f.worker.clone());
                    row.duration_ms = f.duration_ms;
                    row.error = Some(f.error.clone());
                    row.progress = None;
                }
            }
            if ends_build(event) {
                state = match event {
                    StageEvent::Failed(_) => BuildState::Failed,
                    _ => BuildState::Completed,
                };
            }
        }
        stages.sort_by_key(|s| Stage::ALL.iter().position(|x| *x == s.stage));
        BuildStatus {
            build: build.to_string(),
            state,
            commit,
            stages,
        }
    }

    /// True when no more events will come.
    pub fn ended(&self) -> bool {
        matches!(self.state, BuildState::Completed | BuildState::Failed)
    }
}

impl StageStatus {
    /// One line for people: stage, state, cache, seconds, time, worker (and the error).
    pub fn line(&self) -> String {
        let status = match self.status {
            StageState::Started => "started",
            StageState::Completed => "completed",
            StageState::Failed => "failed",
        };
        let cache = self
            .cache
            .map(|c| c.to_string())
            .unwrap_or_else(|| "-".into());
        let secs = self
            .duration_ms
            .map(|ms| format!("{:.2}s", ms as f64 / 1000.0))
            .unwrap_or_else(|| "-".into());
        let time = self
            .time
            .as_ref()
            .or(self.started.as_ref())
            .map(time_text)
            .unwrap_or_else(|| "-".into());
        let mut line = format!(
            "{:>8} {:<9} {:<6} {:>8} {:<24} {}",
            self.stage.name(),
            status,
            cache,
            secs,
            time,
            self.worker.as_deref().unwrap_or("-")
        );
        if let Some(p) = &self.progress {
            line.push_str(&format!("  {p}"));
        }
        if let Some(e) = &self.error {
            line.push_str(&format!("\n{:>8} {}", "", error_text(e)));
        }
        line
    }
}

/// The deploy messages (`kiln.deploy.<agent>.completed|failed`) that name `build`, in stream
/// order, each with `kind` (`completed` or `failed`) added.
pub async fn deployments(
    bus: &super::Bus,
    build: &str,
) -> Result<Vec<serde_json::Value>, super::BusError> {
    let mut out = Vec::new();
    for m in bus.stored_messages("kiln.deploy.>").await? {
        let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&m.payload) else {
            continue;
        };
        if v["build"].as_str() != Some(build) {
            continue;
        }
        v["kind"] = m.subject.rsplit('.').next().unwrap_or("").into();
        out.push(v);
    }
    Ok(out)
}

/// A build's status, where its image was deployed and, once a worker indexed it, its entry in
/// the list of builds (`summary`: recipe, requester, image, reference), as `kiln status --json`
/// and `GET /v1/builds/{id}` show it.
pub async fn status_document(
    bus: &super::Bus,
    status: &BuildStatus,
    deployments: Vec<serde_json::Value>,
) -> Result<serde_json::Value, super::BusError> {
    let mut doc = serde_json::to_value(status).unwrap_or_default();
    doc["deployments"] = deployments.into();
    if let Some(index) = super::BuildIndex::open_existing(bus).await?
        && let Some(summary) = index.get(&status.build).await?
    {
        doc["summary"] = serde_json::to_value(summary).unwrap_or_default();
    }
    Ok(doc)
}

/// An event time as RFC 3339 text.
pub fn time_text(t: &EventTime) -> String {
    match t {
        EventTime::Rfc3339(s) => s.clone(),
        EventTime::UnixMs(ms) => crate::time::rfc3339(
            i64::try_from(*ms).unwrap_or(i64::MAX),
            crate::time::Precision::Millis,
        ),
    }
}

/// A failure in one line: kind, `file:line:column` and message; then, indented, what to do.
pub fn error_text(e: &ErrorInfo) -> String {
    let kind = serde_json::to_value(e.kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| "error".into());
    let mut text = match e.location() {
        Some(place) => format!("{kind} error at {place}: {}", e.message),
        None => format!("{kind} error: {}", e.message),
    };
    if let Some(help) = &e.help {
        text.push_str(&format!("\n    help: {help}"));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::VERSION;
    use crate::bus::messages::{ErrorKind, StageCompleted, StageFailed, StageStarted};

    fn rec(sequence: u64, event: StageEvent) -> RecordedEvent {
        RecordedEvent {
            sequence,
            subject: event.subject(),
            event: Ok(event),
        }
    }

    fn started(stage: Stage) -> StageEvent {
        StageEvent::Started(StageStarted {
            v: VERSION,
            build: "b".into(),
            stage,
            worker: "h/1".into(),
            time: EventTime::UnixMs(1000),
            attempt: Some(1),
        })
    }

    fn completed(stage: Stage, outputs: serde_json::Value) -> StageEvent {
        StageEvent::Completed(StageCompleted {
            v: crate::bus::COMPLETED_VERSION,
            build: "b".into(),
            stage,
            worker: "h/2".into(),
            time: EventTime::UnixMs(2000),
            outputs,
            state_digest: format!("sha256:{}", "0".repeat(64)),
            cache: CacheStatus::Hit,
            duration_ms: 5,
        })
    }

    #[test]
    fn summary_follows_the_latest_event_of_each_stage() {
        assert_eq!(BuildStatus::from_events("b", &[]).state, BuildState::Queued);
        let events = vec![
            rec(1, started(Stage::Source)),
            rec(
                2,
                completed(Stage::Source, serde_json::json!({"commit": "abc"})),
            ),
            rec(3, started(Stage::Render)),
        ];
        let s = BuildStatus::from_events("b", &events);
        assert_eq!(s.state, BuildState::Running);
        assert_eq!(s.commit.as_deref(), Some("abc"));
        assert_eq!(s.stages.len(), 2);
        assert_eq!(s.stages[0].status, StageState::Completed);
        assert_eq!(s.stages[0].worker.as_deref(), Some("h/2"));
        assert_eq!(s.stages[0].cache, Some(CacheStatus::Hit));
        assert_eq!(s.stages[1].status, StageState::Started);
        assert!(!s.ended());

        let mut failed = events.clone();
        let mut error = ErrorInfo::new(ErrorKind::Recipe, "unknown field");
        error.file = Some("r.yaml".into());
        error.line = Some(3);
        error.column = Some(1);
        failed.push(rec(
            4,
            StageEvent::Failed(StageFailed {
                v: VERSION,
                build: "b".into(),
                stage: Stage::Render,
                worker: "h/3".into(),
                time: EventTime::UnixMs(3000),
                error,
                attempts: Some(1),
                duration_ms: Some(7),
            }),
        ));
        let s = BuildStatus::from_events("b", &failed);
        assert_eq!(s.state, BuildState::Failed);
        assert!(s.ended());
        assert!(s.stages[1].line().contains("r.yaml:3:1: unknown field"));
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["stages"][1]["status"], "failed");
        assert_eq!(json["stages"][1]["error"]["line"], 3);

        let mut done = events;
        done.push(rec(5, completed(Stage::Verify, serde_json::json!({}))));
        assert_eq!(
            BuildStatus::from_events("b", &done).state,
            BuildState::Running
        );
        done.push(rec(6, completed(Stage::Publish, serde_json::json!({}))));
        assert_eq!(
            BuildStatus::from_events("b", &done).state,
            BuildState::Completed
        );
    }
}
