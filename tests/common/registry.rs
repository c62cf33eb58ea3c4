//! A real OCI registry for tests: Debian's `docker-registry` (distribution 2.8) on a free
//! loopback port, its storage in a temp dir, stopped when dropped.

use super::{Running, free_port};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A running `docker-registry`; stopped (by its [`Running`] guard) before its storage goes.
pub struct RegistryServer {
    pub child: Running,
    pub port: u16,
    /// Holds `data/` (the storage), `config.yml` and `registry.log`.
    pub root: tempfile::TempDir,
}

/// Start `docker-registry serve`; with `htpasswd`, require basic auth for that file.
pub fn start_registry(htpasswd: Option<&Path>) -> RegistryServer {
    let root = tempfile::tempdir().unwrap();
    let port = free_port();
    let auth = match htpasswd {
        Some(p) => format!(
            "auth:\n  htpasswd:\n    realm: kiln-test\n    path: {}\n",
            p.display()
        ),
        None => String::new(),
    };
    let config = format!(
        "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{auth}",
        root.path().join("data").display()
    );
    let cfg = root.path().join("config.yml");
    std::fs::write(&cfg, config).unwrap();
    let child = Command::new("/usr/bin/docker-registry")
        .arg("serve")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(root.path().join("registry.log")).unwrap())
        .spawn()
        .expect("docker-registry (Debian package docker-registry) must be installed");
    let server = RegistryServer {
        child: Running::new(child),
        port,
        root,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
            .arg(format!("http://127.0.0.1:{port}/v2/"))
            .output()
            .unwrap();
        let code = String::from_utf8_lossy(&out.stdout).to_string();
        if code == "200" || code == "401" {
            return server;
        }
        assert!(
            Instant::now() < deadline,
            "registry did not answer /v2/: {}",
            std::fs::read_to_string(server.root.path().join("registry.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What the [`FakeRegistry`] answers to one request.
pub enum Answer {
    /// A status with an empty body.
    Status(u16),
    /// 200 with a body, its `Content-Type` and, optionally, a `Docker-Content-Digest`.
    Body {
        content_type: &'static str,
        body: Vec<u8>,
        digest: Option<String>,
    },
    /// 200 announcing `body`'s length, then `first` bytes at once, then one byte per `every`.
    Trickle {
        body: Vec<u8>,
        first: usize,
        every: Duration,
    },
    /// 200 with `body` and no `Content-Length`: the end is the closed connection.
    Unsized(Vec<u8>),
}

/// A registry that misbehaves on purpose: a thread on a free loopback port answering each
/// request (`Connection: close`) with what `route(method, path)` says. Records every request
/// line.
pub struct FakeRegistry {
    pub port: u16,
    pub requests: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

pub fn start_fake_registry(
    route: impl Fn(&str, &str) -> Answer + Send + Sync + 'static,
) -> FakeRegistry {
    use std::io::{BufRead, BufReader, Write};
    use std::sync::{Arc, Mutex};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let requests = Arc::new(Mutex::new(Vec::new()));
    let (route, log) = (Arc::new(route), requests.clone());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let (route, log) = (route.clone(), log.clone());
            std::thread::spawn(move || -> std::io::Result<()> {
                let mut reader = BufReader::new(stream.try_clone()?);
                let mut line = String::new();
                reader.read_line(&mut line)?;
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
                        break;
                    }
                }
                let mut words = line.split_whitespace();
                let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
                log.lock().unwrap().push(format!("{method} {path}"));
                let mut out = stream;
                match route(method, path) {
                    Answer::Status(code) => write!(
                        out,
                        "HTTP/1.1 {code} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    )?,
                    Answer::Body {
                        content_type,
                        body,
                        digest,
                    } => {
                        let digest = digest
                            .map(|d| format!("Docker-Content-Digest: {d}\r\n"))
                            .unwrap_or_default();
                        write!(
                            out,
                            "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\n{digest}\
                             Content-Length: {}\r\nConnection: close\r\n\r\n",
                            body.len()
                        )?;
                        if method != "HEAD" {
                            out.write_all(&body)?;
                        }
                    }
                    Answer::Trickle { body, first, every } => {
                        write!(
                            out,
                            "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\
                             Content-Length: {}\r\nConnection: close\r\n\r\n",
                            body.len()
                        )?;
                        out.write_all(&body[..first])?;
                        out.flush()?;
                        for b in &body[first..] {
                            std::thread::sleep(every);
                            out.write_all(&[*b])?;
                            out.flush()?;
                        }
                    }
                    Answer::Unsized(body) => {
                        out.write_all(
                            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\
                              Connection: close\r\n\r\n",
                        )?;
                        out.write_all(&body)?;
                    }
                }
                out.flush()
            });
        }
    });
    FakeRegistry { port, requests }
}
