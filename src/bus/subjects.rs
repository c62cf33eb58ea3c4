//! NATS subject names: the stage order, the subject of every message kiln publishes, and how ids
//! and repository names are made into valid subject tokens.
//!
//! A NATS subject is a list of tokens separated by `.`; a token may not be empty and may not
//! contain `.`, `*`, `>` or whitespace. kiln keeps tokens to `[A-Za-z0-9_-]`: [`sanitize_token`]
//! replaces every other character with `_` (an empty name becomes `_`). The payload always carries
//! the real, unsanitized name; the subject is only for routing and filtering.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Prefix of every kiln subject; the stream `KILN` captures `kiln.>`.
pub const ROOT: &str = "kiln";
/// Where build requests arrive (from `kiln submit`, the HTTP API, the git watcher or a CI system).
pub const BUILD_REQUESTED: &str = "kiln.build.requested";

/// A pipeline stage. The order of [`Stage::ALL`] is the order of the pipeline.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// Fetch the recipe (git checkout or local path) and pin its inputs.
    Source,
    /// Render the recipe templates and validate against the schema.
    Render,
    /// Assemble the root filesystem Tree.
    Rootfs,
    /// Kernel, modules, initramfs, boot loader.
    Kernel,
    /// Partition table, ESP, root filesystem; raw or qcow2 disk.
    Disk,
    /// Boot the disk under QEMU and wait for the marker.
    Verify,
    /// Push to the image store and sign.
    Publish,
}

impl Stage {
    /// Every stage, in pipeline order.
    pub const ALL: [Stage; 7] = [
        Stage::Source,
        Stage::Render,
        Stage::Rootfs,
        Stage::Kernel,
        Stage::Disk,
        Stage::Verify,
        Stage::Publish,
    ];

    /// Lowercase name, as used in subjects and messages.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Source => "source",
            Stage::Render => "render",
            Stage::Rootfs => "rootfs",
            Stage::Kernel => "kernel",
            Stage::Disk => "disk",
            Stage::Verify => "verify",
            Stage::Publish => "publish",
        }
    }

    /// Parse a lowercase stage name.
    pub fn from_name(name: &str) -> Option<Stage> {
        Stage::ALL.into_iter().find(|s| s.name() == name)
    }

    /// The stage before this one (`None` for the first).
    pub fn previous(self) -> Option<Stage> {
        let i = Stage::ALL.iter().position(|s| *s == self)?;
        i.checked_sub(1).map(|p| Stage::ALL[p])
    }

    /// The stage after this one (`None` for the last).
    pub fn next(self) -> Option<Stage> {
        let i = Stage::ALL.iter().position(|s| *s == self)?;
        Stage::ALL.get(i + 1).copied()
    }

    /// The subject whose messages start this stage: `kiln.build.requested` for the first stage,
    /// else the previous stage's `kiln.build.*.<prev>.completed`.
    pub fn trigger_subject(self) -> String {
        match self.previous() {
            None => BUILD_REQUESTED.to_string(),
            Some(prev) => format!("{ROOT}.build.*.{}.{}", prev.name(), EventKind::Completed),
        }
    }

    /// Name of this stage's durable consumer on the `KILN` stream.
    pub fn consumer_name(self) -> String {
        format!("kiln-{}", self.name())
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The last token of a stage event subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    Started,
    Progress,
    Completed,
    Failed,
}

impl EventKind {
    pub const ALL: [EventKind; 4] = [
        EventKind::Started,
        EventKind::Progress,
        EventKind::Completed,
        EventKind::Failed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            EventKind::Started => "started",
            EventKind::Progress => "progress",
            EventKind::Completed => "completed",
            EventKind::Failed => "failed",
        }
    }

    pub fn from_name(name: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.name() == name)
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Make `name` a valid subject token: every character outside `[A-Za-z0-9_-]` becomes `_`; an
/// empty name becomes `_`. Tokens are compared case-sensitively.
pub fn sanitize_token(name: &str) -> String {
    if name.is_empty() {
        return "_".to_string();
    }
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// True when `token` is already what [`sanitize_token`] would make of it.
pub fn is_clean_token(token: &str) -> bool {
    !token.is_empty()
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// `kiln.build.<id>.<stage>.<kind>`; the id is sanitized.
pub fn stage_event(build: &str, stage: Stage, kind: EventKind) -> String {
    format!(
        "{ROOT}.build.{}.{}.{}",
        sanitize_token(build),
        stage.name(),
        kind.name()
    )
}

/// `kiln.build.<id>.>`: every stage event of one build.
pub fn build_events(build: &str) -> String {
    format!("{ROOT}.build.{}.>", sanitize_token(build))
}

/// `kiln.image.published.<repository>`; the repository is sanitized (`registry:5000/team/app`
/// becomes `registry_5000_team_app`).
pub fn image_published(repository: &str) -> String {
    format!("{ROOT}.image.published.{}", sanitize_token(repository))
}

/// `kiln.image.revoked.<repository>`; the repository is sanitized as for
/// [`image_published`].
pub fn image_revoked(repository: &str) -> String {
    format!("{ROOT}.image.revoked.{}", sanitize_token(repository))
}

/// Outcome of a deployment on one agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeployKind {
    Completed,
    Failed,
}

impl DeployKind {
    pub fn name(self) -> &'static str {
        match self {
            DeployKind::Completed => "completed",
            DeployKind::Failed => "failed",
        }
    }
}

/// `kiln.deploy.<agent>.completed|failed`; the agent name is sanitized.
pub fn deploy(agent: &str, kind: DeployKind) -> String {
    format!("{ROOT}.deploy.{}.{}", sanitize_token(agent), kind.name())
}

/// `kiln.agent.<agent>.heartbeat`; the agent name is sanitized.
pub fn agent_heartbeat(agent: &str) -> String {
    format!("{ROOT}.agent.{}.heartbeat", sanitize_token(agent))
}

/// `kiln.agent.<agent>.deploy`: rollout orders for one agent; the agent name is sanitized.
pub fn agent_deploy(agent: &str) -> String {
    format!("{ROOT}.agent.{}.deploy", sanitize_token(agent))
}

/// `kiln.rollout.<id>.<event>`.
pub fn rollout_event(id: &str, event: &str) -> String {
    format!(
        "{ROOT}.rollout.{}.{}",
        sanitize_token(id),
        sanitize_token(event)
    )
}

/// Every event of one rollout: `kiln.rollout.<id>.>`.
pub fn rollout_events(id: &str) -> String {
    format!("{ROOT}.rollout.{}.>", sanitize_token(id))
}

/// A parsed `kiln.build.<id>.<stage>.<kind>` subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageSubject {
    pub build: String,
    pub stage: Stage,
    pub kind: EventKind,
}

/// Parse a stage event subject; `None` when it is not one.
pub fn parse_stage_subject(subject: &str) -> Option<StageSubject> {
    let mut parts = subject.split('.');
    let (root, build_word, id, stage, kind) = (
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
    );
    if parts.next().is_some() || root != ROOT || build_word != "build" {
        return None;
    }
    Some(StageSubject {
        build: id.to_string(),
        stage: Stage::from_name(stage)?,
        kind: EventKind::from_name(kind)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_order_and_triggers() {
        assert_eq!(Stage::Source.trigger_subject(), "kiln.build.requested");
        assert_eq!(
            Stage::Render.trigger_subject(),
            "kiln.build.*.source.completed"
        );
        assert_eq!(
            Stage::Publish.trigger_subject(),
            "kiln.build.*.verify.completed"
        );
        assert_eq!(Stage::Publish.next(), None);
        assert_eq!(Stage::Source.previous(), None);
        for s in Stage::ALL {
            assert_eq!(Stage::from_name(s.name()), Some(s));
            if let Some(n) = s.next() {
                assert_eq!(n.previous(), Some(s));
            }
        }
    }

    #[test]
    fn tokens_are_sanitized() {
        assert_eq!(sanitize_token(""), "_");
        assert_eq!(sanitize_token("a.b *>c\td"), "a_b___c_d");
        assert_eq!(sanitize_token("Build-42_x"), "Build-42_x");
        assert_eq!(
            image_published("registry:5000/team/app"),
            "kiln.image.published.registry_5000_team_app"
        );
        assert_eq!(
            stage_event("x.y", Stage::Disk, EventKind::Failed),
            "kiln.build.x_y.disk.failed"
        );
        assert_eq!(
            deploy("host 1", DeployKind::Completed),
            "kiln.deploy.host_1.completed"
        );
        assert!(is_clean_token("abc-1_2"));
        assert!(!is_clean_token("a.b"));
    }

    #[test]
    fn stage_subjects_parse() {
        let s = parse_stage_subject("kiln.build.b1.rootfs.progress").unwrap();
        assert_eq!(s.build, "b1");
        assert_eq!(s.stage, Stage::Rootfs);
        assert_eq!(s.kind, EventKind::Progress);
        assert!(parse_stage_subject("kiln.build.requested").is_none());
        assert!(parse_stage_subject("kiln.build.b1.nope.started").is_none());
        assert!(parse_stage_subject("kiln.build.b1.disk.started.x").is_none());
    }
}
