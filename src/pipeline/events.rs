//! What a build's messages say, for people and programs, read back from the `KILN` stream: one
//! line (or JSON object) per stage event (`kiln logs`, `kiln submit --follow`, `kiln build`);
//! each stage's latest state is [`crate::bus::status`], the list of recent builds the build
//! index ([`crate::bus::index`]). Pure functions over messages, so the HTTP front end shows the same.

use crate::bus::StageEvent;
pub use crate::bus::index::{BuildPhase, BuildSummary};
pub use crate::bus::status::{ends_build, error_text, time_text};
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
    use crate::bus::{self, ErrorInfo, ErrorKind, EventTime, StageFailed, StageStarted};

    #[test]
    fn events_read_as_lines() {
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
