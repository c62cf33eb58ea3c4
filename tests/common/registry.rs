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

/// One request through a [`CountingProxy`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proxied {
    pub method: String,
    pub path: String,
    pub range_start: Option<u64>,
    pub answered: bool,
}

/// A loopback HTTP proxy in front of a registry that counts the bytes the registry sends
/// through it (the oracle for what a pull fetched, independent of kiln's own report), logs
/// each request, and on request corrupts or refuses the blobs it is told about.
pub struct CountingProxy {
    pub port: u16,
    /// Bytes of responses (headers and bodies) passed to clients.
    pub bytes: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Each request: method, path, the first byte of its `Range` (if any), and whether it was
    /// answered.
    pub log: std::sync::Arc<std::sync::Mutex<Vec<Proxied>>>,
    /// Blobs (`sha256:…`, or `sha256:…@START` for the range from byte START) whose answer gets
    /// its last byte flipped.
    pub corrupt: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    /// Blobs (as for `corrupt`) whose requests are dropped without an answer, half a second
    /// after they came.
    pub refuse: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

impl CountingProxy {
    /// Start one in front of `127.0.0.1:upstream`.
    pub fn start(upstream: u16) -> CountingProxy {
        use std::sync::{Arc, Mutex};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let proxy = CountingProxy {
            port: listener.local_addr().unwrap().port(),
            bytes: Arc::default(),
            log: Arc::new(Mutex::new(Vec::new())),
            corrupt: Arc::default(),
            refuse: Arc::default(),
        };
        let (bytes, log) = (proxy.bytes.clone(), proxy.log.clone());
        let (corrupt, refuse) = (proxy.corrupt.clone(), proxy.refuse.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let (bytes, log) = (bytes.clone(), log.clone());
                let (corrupt, refuse) = (corrupt.clone(), refuse.clone());
                std::thread::spawn(move || {
                    let _ = serve_proxied(client, upstream, &bytes, &log, &corrupt, &refuse);
                });
            }
        });
        proxy
    }

    /// Bytes passed so far, and forget them.
    pub fn take_bytes(&self) -> u64 {
        self.bytes.swap(0, std::sync::atomic::Ordering::SeqCst)
    }

    /// The requests so far, and forget them.
    pub fn take_log(&self) -> Vec<Proxied> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

/// One client connection, one request (no body: GET or HEAD), sent to the registry on a
/// connection of its own that closes after the answer, which is passed back whole.
fn serve_proxied(
    mut client: std::net::TcpStream,
    upstream: u16,
    bytes: &std::sync::atomic::AtomicU64,
    log: &std::sync::Mutex<Vec<Proxied>>,
    corrupt: &std::sync::Mutex<std::collections::HashSet<String>>,
    refuse: &std::sync::Mutex<std::collections::HashSet<String>>,
) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if client.read(&mut byte)? == 0 {
            return Ok(());
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).to_string();
    let mut words = text.split_whitespace();
    let method = words.next().unwrap_or("").to_string();
    let path = words.next().unwrap_or("").to_string();
    let blob = path.rsplit_once("/blobs/").map(|(_, d)| d.to_string());
    let range_start: Option<u64> = text
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("range: bytes=")
                .map(str::to_string)
        })
        .and_then(|r| r.split('-').next().and_then(|n| n.trim().parse().ok()));
    let is = |set: &std::sync::Mutex<std::collections::HashSet<String>>| {
        let set = set.lock().unwrap();
        blob.as_ref().is_some_and(|d| {
            set.contains(d) || range_start.is_some_and(|r| set.contains(&format!("{d}@{r}")))
        })
    };
    let entry = |answered| Proxied {
        method: method.clone(),
        path: path.clone(),
        range_start,
        answered,
    };
    if is(refuse) {
        log.lock().unwrap().push(entry(false));
        // Dropped after a while (the requests in flight beside it finish first): the client
        // sees the connection close without an answer.
        std::thread::sleep(std::time::Duration::from_millis(500));
        return Ok(());
    }
    let forwarded: String = text
        .split("\r\n")
        .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
        .collect::<Vec<_>>()
        .join("\r\n");
    let forwarded = forwarded.trim_end().to_string() + "\r\nConnection: close\r\n\r\n";
    let mut up = std::net::TcpStream::connect(("127.0.0.1", upstream))?;
    up.write_all(forwarded.as_bytes())?;
    let mut answer = Vec::new();
    up.read_to_end(&mut answer)?;
    if method == "GET" && is(corrupt) && answer.len() > 1 {
        *answer.last_mut().unwrap() ^= 0x5a;
    }
    bytes.fetch_add(answer.len() as u64, std::sync::atomic::Ordering::SeqCst);
    log.lock().unwrap().push(entry(true));
    // The registry closed after this answer; so does the proxy (the client sees
    // `Connection: close`).
    client.write_all(&answer)
}
