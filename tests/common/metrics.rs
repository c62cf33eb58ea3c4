//! Prometheus metrics in tests: a `/metrics` text checked by Prometheus's own
//! `promtool check metrics` (Debian package `prometheus`), and its samples read back.

use std::io::Write;
use std::process::{Command, Stdio};

/// Scrape `url` and check the text with `promtool check metrics` (on stdin); the text.
pub fn checked_metrics(url: &str) -> String {
    let text = String::from_utf8(super::curl(&["-sf", url])).expect("UTF-8 metrics");
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; .ci/setup installs it)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let o = child.wait_with_output().expect("promtool");
    assert!(
        o.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    text
}

/// The value of the series `name{labels}` (labels exactly as the text writes them), if present.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}
