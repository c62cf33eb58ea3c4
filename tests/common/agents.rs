//! Agents in tests: `kiln agent --json` as a process whose lines arrive on a channel, the QEMU
//! processes of a state directory (and their reaper), a page through an agent's stable
//! address, and builds of `recipes/app.yaml` submitted to a running `kiln up`.

use super::{Running, json_lines, kiln};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The QEMU processes whose command line names `dir` (the agent's state directory).
pub fn qemus_in(dir: &Path) -> Vec<u32> {
    let needle = dir.display().to_string();
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.contains("qemu-system") && cmd.contains(&needle) {
            pids.push(pid);
        }
    }
    pids
}

/// Kills the agent's VMs when the test ends, however it ends (they outlive the agent on
/// purpose).
pub struct VmReaper(pub PathBuf);

impl Drop for VmReaper {
    fn drop(&mut self) {
        for pid in qemus_in(&self.0) {
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
            }
        }
    }
}

/// `kiln agent --json`, its stdout lines arriving on a channel.
pub struct Agent {
    pub proc: Running,
    pub lines: mpsc::Receiver<serde_json::Value>,
    pub log: PathBuf,
}

impl Agent {
    pub fn start(mut cmd: Command, log: &Path) -> Agent {
        let err = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let mut child = cmd.stdout(Stdio::piped()).stderr(err).spawn().unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let v: serde_json::Value =
                    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        Agent {
            proc: Running::new(child),
            lines: rx,
            log: log.to_path_buf(),
        }
    }

    /// The next line, which must be of `kind` (`ready`, `completed`, `failed`), within `limit`.
    pub fn next(&self, kind: &str, limit: Duration) -> serde_json::Value {
        let log = || std::fs::read_to_string(&self.log).unwrap_or_default();
        match self.lines.recv_timeout(limit) {
            Ok(v) if v["kind"] == kind => v,
            Ok(v) => panic!(
                "expected a {kind} line from the agent, got {v}\nagent log:\n{}",
                log()
            ),
            Err(e) => panic!(
                "no {kind} line from the agent within {limit:?} ({e})\nagent log:\n{}",
                log()
            ),
        }
    }
}

pub fn show(o: &Output, log: &Path) -> String {
    format!(
        "stdout:\n{}\nstderr:\n{}\nlog {}:\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
        log.display(),
        std::fs::read_to_string(log).unwrap_or_default()
    )
}

/// One HTTP GET through the agent's stable address: the page the guest serves.
pub fn page(port: u16) -> String {
    try_page(port).unwrap_or_else(|e| panic!("GET / through 127.0.0.1:{port}: {e}"))
}

/// [`page`], with the error when the address does not take the connection or the request.
pub fn try_page(port: u16) -> std::io::Result<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    Ok(text)
}

/// Submit `recipes/app.yaml` with `sets` to the running `kiln up`; returns the events.
pub fn submit(home: &Path, url: &str, sets: &[&str], log: &Path) -> Vec<serde_json::Value> {
    let mut c = kiln(home);
    c.args([
        "submit",
        "recipes/app.yaml",
        "--follow",
        "--timeout",
        "600",
        "--json",
        "--nats",
        url,
    ]);
    for s in sets {
        c.args(["--set", s]);
    }
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", show(&o, log));
    let events = json_lines(&o);
    let last = events.last().unwrap();
    assert_eq!(
        (last["kind"].as_str(), last["stage"].as_str()),
        (Some("completed"), Some("publish")),
        "{}",
        show(&o, log)
    );
    events
}
