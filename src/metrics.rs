//! Prometheus metrics of this process in the text exposition format (version 0.0.4): what its
//! workers did (builds by state, stage durations, cache hits and misses, retries and failures by
//! error kind), what its agent did (deployments, rollbacks, the image running now), and gauges
//! read when scraped (pending messages per stage consumer, bytes in the local cache and in the
//! object store). Counters count since the process started, as Prometheus expects.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Mutex, OnceLock};

/// Upper bounds (seconds) of the stage duration histogram's buckets.
const STAGE_BUCKETS: [f64; 14] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
];

#[derive(Debug, Default, Clone)]
struct Histogram {
    /// Observations at or below each bound of [`STAGE_BUCKETS`].
    buckets: [u64; STAGE_BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, v: f64) {
        for (i, b) in STAGE_BUCKETS.iter().enumerate() {
            if v <= *b {
                self.buckets[i] += 1;
            }
        }
        self.count += 1;
        self.sum += v;
    }
}

/// The image an agent runs now.
#[derive(Debug, Clone)]
struct Running {
    agent: String,
    reference: String,
    digest: String,
}

#[derive(Debug, Default)]
struct State {
    builds: BTreeMap<String, u64>,
    stage_seconds: BTreeMap<String, Histogram>,
    cache: BTreeMap<(String, String), u64>,
    retries: BTreeMap<(String, String), u64>,
    failures: BTreeMap<(String, String), u64>,
    deployments: BTreeMap<(String, String), u64>,
    rollbacks: BTreeMap<String, u64>,
    running: Option<Running>,
}

/// This process's metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    state: Mutex<State>,
}

/// The metrics of this process.
pub fn global() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::default)
}

impl Metrics {
    fn with(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// A build ended on this worker: `succeeded` or `failed`.
    pub fn build_ended(&self, state: &str) {
        self.with(|s| *s.builds.entry(state.into()).or_default() += 1);
    }

    /// A stage completed after `seconds`, a cache `hit` or `miss`.
    pub fn stage_completed(&self, stage: &str, seconds: f64, cache: &str) {
        self.with(|s| {
            s.stage_seconds
                .entry(stage.into())
                .or_default()
                .observe(seconds);
            *s.cache.entry((stage.into(), cache.into())).or_default() += 1;
        });
    }

    /// A stage attempt failed and will be retried.
    pub fn retry(&self, stage: &str, kind: &str) {
        self.with(|s| *s.retries.entry((stage.into(), kind.into())).or_default() += 1);
    }

    /// A stage failed for good.
    pub fn failure(&self, stage: &str, kind: &str) {
        self.with(|s| *s.failures.entry((stage.into(), kind.into())).or_default() += 1);
    }

    /// A deployment of `agent` ended: `completed` or `failed`; `rolled_back` when the old image
    /// kept (or went back to) running.
    pub fn deployment(&self, agent: &str, result: &str, rolled_back: bool) {
        self.with(|s| {
            *s.deployments
                .entry((agent.into(), result.into()))
                .or_default() += 1;
            if rolled_back {
                *s.rollbacks.entry(agent.into()).or_default() += 1;
            }
        });
    }

    /// The image `agent` runs now.
    pub fn running_image(&self, agent: &str, reference: &str, digest: &str) {
        self.with(|s| {
            s.running = Some(Running {
                agent: agent.into(),
                reference: reference.into(),
                digest: digest.into(),
            })
        });
    }

    /// The exposition of everything recorded, then `gauges`.
    pub fn render(&self, gauges: &[Gauge]) -> String {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Exposition::default();
        out.family(
            "kiln_builds_total",
            "Builds that ended on this worker, by state.",
            "counter",
        );
        for state in ["succeeded", "failed"] {
            let n = s.builds.get(state).copied().unwrap_or(0);
            out.sample("kiln_builds_total", &[("state", state)], n as f64);
        }
        out.family(
            "kiln_stage_duration_seconds",
            "Time a stage took on this worker, cache hits included.",
            "histogram",
        );
        for (stage, h) in &s.stage_seconds {
            for (i, b) in STAGE_BUCKETS.iter().enumerate() {
                let le = format!("{b}");
                out.sample(
                    "kiln_stage_duration_seconds_bucket",
                    &[("stage", stage), ("le", &le)],
                    h.buckets[i] as f64,
                );
            }
            out.sample(
                "kiln_stage_duration_seconds_bucket",
                &[("stage", stage), ("le", "+Inf")],
                h.count as f64,
            );
            out.sample(
                "kiln_stage_duration_seconds_sum",
                &[("stage", stage)],
                h.sum,
            );
            out.sample(
                "kiln_stage_duration_seconds_count",
                &[("stage", stage)],
                h.count as f64,
            );
        }
        out.family(
            "kiln_stage_cache_total",
            "Stages that completed, by stage and cache result (hit or miss).",
            "counter",
        );
        for ((stage, result), n) in &s.cache {
            out.sample(
                "kiln_stage_cache_total",
                &[("stage", stage), ("result", result)],
                *n as f64,
            );
        }
        out.family(
            "kiln_stage_retries_total",
            "Stage attempts that failed and were retried, by stage and error kind.",
            "counter",
        );
        for ((stage, kind), n) in &s.retries {
            out.sample(
                "kiln_stage_retries_total",
                &[("stage", stage), ("kind", kind)],
                *n as f64,
            );
        }
        out.family(
            "kiln_stage_failures_total",
            "Stages that failed for good, by stage and error kind.",
            "counter",
        );
        for ((stage, kind), n) in &s.failures {
            out.sample(
                "kiln_stage_failures_total",
                &[("stage", stage), ("kind", kind)],
                *n as f64,
            );
        }
        if !s.deployments.is_empty() || s.running.is_some() || !s.rollbacks.is_empty() {
            out.family(
                "kiln_agent_deployments_total",
                "Deployments this agent ended, by result (completed or failed).",
                "counter",
            );
            for ((agent, result), n) in &s.deployments {
                out.sample(
                    "kiln_agent_deployments_total",
                    &[("agent", agent), ("result", result)],
                    *n as f64,
                );
            }
            out.family(
                "kiln_agent_rollbacks_total",
                "Deployments whose new image was not healthy, so the previous one kept running.",
                "counter",
            );
            for (agent, n) in &s.rollbacks {
                out.sample("kiln_agent_rollbacks_total", &[("agent", agent)], *n as f64);
            }
            out.family(
                "kiln_agent_image_info",
                "The image this agent runs now (value 1; the labels say which).",
                "gauge",
            );
            if let Some(r) = &s.running {
                out.sample(
                    "kiln_agent_image_info",
                    &[
                        ("agent", &r.agent),
                        ("reference", &r.reference),
                        ("digest", &r.digest),
                    ],
                    1.0,
                );
            }
        }
        drop(s);
        for g in gauges {
            out.family(g.name, g.help, "gauge");
            for (labels, v) in &g.samples {
                let labels: Vec<(&str, &str)> =
                    labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
                out.sample(g.name, &labels, *v);
            }
        }
        out.text
    }
}

/// A gauge read when scraped.
#[derive(Debug, Clone)]
pub struct Gauge {
    pub name: &'static str,
    pub help: &'static str,
    pub samples: Vec<(Vec<(&'static str, String)>, f64)>,
}

/// The text format, line by line.
#[derive(Debug, Default)]
struct Exposition {
    text: String,
}

impl Exposition {
    fn family(&mut self, name: &str, help: &str, kind: &str) {
        let _ = writeln!(self.text, "# HELP {name} {}", escape(help, false));
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{k}=\"{}\"", escape(v, true));
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {}", number(value));
    }
}

/// A label value (`\`, `"`, newline escaped) or HELP text (`\`, newline).
fn escape(text: &str, quote: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if quote => out.push_str("\\\""),
            c => out.push(c),
        }
    }
    out
}

fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// The `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Gauges of a `kiln up` scrape: pending messages per stage consumer, bytes in the object store
/// and in the local cache (`cache_bytes`, measured by the caller).
pub async fn bus_gauges(bus: &crate::bus::Bus, cache_bytes: Option<u64>) -> Vec<Gauge> {
    let mut pending = Gauge {
        name: "kiln_stage_pending_messages",
        help: "Messages waiting for each stage's consumer (the queue).",
        samples: Vec::new(),
    };
    if let Ok(stream) = bus.jetstream().get_stream(crate::bus::STREAM).await {
        for stage in crate::bus::Stage::ALL {
            let consumer: Result<async_nats::jetstream::consumer::PullConsumer, _> =
                stream.get_consumer(&stage.consumer_name()).await;
            if let Ok(mut c) = consumer
                && let Ok(info) = c.info().await
            {
                pending.samples.push((
                    vec![("stage", stage.name().to_string())],
                    info.num_pending as f64,
                ));
            }
        }
    }
    let mut gauges = vec![pending];
    let object_stream = format!("OBJ_{}", crate::bus::BLOB_BUCKET);
    if let Ok(mut s) = bus.jetstream().get_stream(&object_stream).await
        && let Ok(info) = s.info().await
    {
        gauges.push(Gauge {
            name: "kiln_object_store_bytes",
            help: "Bytes stored in the kiln-blobs object store.",
            samples: vec![(Vec::new(), info.state.bytes as f64)],
        });
    }
    if let Some(bytes) = cache_bytes {
        gauges.push(Gauge {
            name: "kiln_cache_bytes",
            help: "Bytes on disk of this worker's cache ($KILN_HOME blobs, records, kernel builds).",
            samples: vec![(Vec::new(), bytes as f64)],
        });
    }
    gauges
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_help_type_and_escaped_labels() {
        let m = Metrics::default();
        m.build_ended("succeeded");
        m.stage_completed("disk", 3.0, "miss");
        m.stage_completed("disk", 0.01, "hit");
        m.running_image("hv \"1\"", "r:t@sha256:ab", "sha256:ab");
        let text = m.render(&[]);
        assert!(
            text.contains("kiln_builds_total{state=\"succeeded\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("kiln_builds_total{state=\"failed\"} 0\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE kiln_stage_duration_seconds histogram\n"));
        assert!(
            text.contains("kiln_stage_duration_seconds_bucket{stage=\"disk\",le=\"0.05\"} 1\n")
        );
        assert!(
            text.contains("kiln_stage_duration_seconds_bucket{stage=\"disk\",le=\"+Inf\"} 2\n")
        );
        assert!(text.contains("kiln_stage_duration_seconds_count{stage=\"disk\"} 2\n"));
        assert!(text.contains("agent=\"hv \\\"1\\\"\""), "{text}");
        assert_eq!(number(0.25), "0.25");
        assert_eq!(number(3.0), "3");
    }
}
