//! `kiln up` in tests: the process with its stdout lines on a channel ([`Lines`]) and the base
//! URL of its API on a free loopback port ([`kiln_up`]).

use super::{Running, kiln};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A child process (stopped by its [`Running`] guard when dropped) with its stdout lines on a
/// channel.
pub struct Lines {
    _proc: Running,
    lines: mpsc::Receiver<String>,
    log: PathBuf,
}

impl Lines {
    pub fn spawn(mut c: Command, log: &Path) -> Lines {
        let f = std::fs::File::create(log).unwrap();
        let mut child = c.stdout(Stdio::piped()).stderr(f).spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Lines {
            _proc: Running::new(child),
            lines,
            log: log.to_path_buf(),
        }
    }

    /// The next stdout line within `wait`.
    pub fn line(&self, wait: Duration) -> Option<String> {
        self.lines.recv_timeout(wait).ok()
    }

    /// What it wrote on stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// `kiln up --listen 127.0.0.1:0` on `nats` with the project's recipe roots, `extra` arguments
/// and `token` in `$KILN_API_TOKEN` (stderr in `home/up.log`), `customize` applied to the
/// command before it starts; returns the process and the API's base URL.
pub fn kiln_up(
    home: &Path,
    nats: &str,
    extra: &[&str],
    token: Option<&str>,
    customize: impl FnOnce(&mut Command),
) -> (Lines, String) {
    let mut c = kiln(home);
    c.args(["up", "--nats", nats, "--listen", "127.0.0.1:0"])
        .args(super::recipe_roots())
        .args(extra);
    if let Some(token) = token {
        c.env("KILN_API_TOKEN", token);
    }
    customize(&mut c);
    let up = Lines::spawn(c, &home.join("up.log"));
    let line = up
        .line(Duration::from_secs(60))
        .unwrap_or_else(|| panic!("kiln up printed no URL\n{}", up.log()));
    let base = line
        .strip_prefix("kiln api listening on ")
        .unwrap_or_else(|| panic!("unexpected line {line:?}"))
        .to_string();
    assert!(base.starts_with("http://127.0.0.1:"), "{base}");
    (up, base)
}
