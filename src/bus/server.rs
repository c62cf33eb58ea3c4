//! A private `nats-server` with JetStream for one process: `kiln build` without `--nats`, and the
//! tests (one server each). Listens on 127.0.0.1 on a free port, stores in a temp dir, and is
//! killed and reaped when dropped.

use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Why the private server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(
        "nats-server not found (looked on PATH, in /usr/sbin and /usr/bin, or at KILN_NATS_SERVER): install the Debian package `nats-server` (apt-get install nats-server), pass a NATS URL with --nats, or build without NATS with --no-bus"
    )]
    NotInstalled,
    #[error("cannot {what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "nats-server on 127.0.0.1:{port} did not accept connections within {secs} s; its log {log}:\n{tail}"
    )]
    NotReady {
        port: u16,
        secs: u64,
        log: PathBuf,
        tail: String,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServerError {
    let what = what.into();
    move |source| ServerError::Io { what, source }
}

/// A running private `nats-server -js`.
#[derive(Debug)]
pub struct PrivateServer {
    child: Option<Child>,
    port: u16,
    store_dir: PathBuf,
    log: PathBuf,
    extra_args: Vec<String>,
    _temp: Option<tempfile::TempDir>,
}

/// The `nats-server` to run: `KILN_NATS_SERVER` (a path, or a name looked up on PATH only) when
/// set, else `nats-server` on PATH, then in /usr/sbin (where Debian installs it) and /usr/bin.
fn nats_server_binary() -> Option<PathBuf> {
    match std::env::var_os("KILN_NATS_SERVER") {
        Some(bin) if Path::new(&bin).components().count() > 1 => {
            Some(PathBuf::from(bin)).filter(|p| p.is_file())
        }
        Some(name) => {
            let path = std::env::var_os("PATH")?;
            std::env::split_paths(&path)
                .map(|d| d.join(&name))
                .find(|p| p.is_file())
        }
        None => find_on_path("nats-server"),
    }
}

/// Find an executable on PATH.
fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A port that was free a moment ago on 127.0.0.1.
fn free_port() -> Result<u16, ServerError> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(io("bind a free port on 127.0.0.1"))?;
    let port = l
        .local_addr()
        .map_err(io("read the free port's address"))?
        .port();
    Ok(port)
}

impl PrivateServer {
    /// Start a server with JetStream in a new temp dir on a free port.
    pub fn start() -> Result<PrivateServer, ServerError> {
        Self::start_with_args(&[])
    }

    /// Like [`PrivateServer::start`], with more `nats-server` arguments (e.g. `--user`,
    /// `--pass`).
    pub fn start_with_args(args: &[&str]) -> Result<PrivateServer, ServerError> {
        let temp = tempfile::Builder::new()
            .prefix("kiln-nats-")
            .tempdir()
            .map_err(io("create a temp dir for nats-server"))?;
        let store = temp.path().join("jetstream");
        let mut server = PrivateServer {
            child: None,
            port: free_port()?,
            log: store.with_extension("log"),
            store_dir: store,
            extra_args: args.iter().map(|a| a.to_string()).collect(),
            _temp: Some(temp),
        };
        server.spawn()?;
        Ok(server)
    }

    /// Start a server storing JetStream data in `store_dir` (kept after the server stops) on
    /// `port`. Starting again with the same dir and port resumes the same streams.
    pub fn start_in(store_dir: &Path, port: u16) -> Result<PrivateServer, ServerError> {
        let mut server = PrivateServer {
            child: None,
            port,
            store_dir: store_dir.to_path_buf(),
            log: store_dir.with_extension("log"),
            extra_args: Vec::new(),
            _temp: None,
        };
        server.spawn()?;
        Ok(server)
    }

    fn spawn(&mut self) -> Result<(), ServerError> {
        let bin = nats_server_binary().ok_or(ServerError::NotInstalled)?;
        std::fs::create_dir_all(&self.store_dir).map_err(io(format!(
            "create the JetStream directory {}",
            self.store_dir.display()
        )))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(io(format!("open {}", self.log.display())))?;
        let log2 = log
            .try_clone()
            .map_err(io(format!("open {}", self.log.display())))?;
        let child = Command::new(&bin)
            .arg("-js")
            .arg("-sd")
            .arg(&self.store_dir)
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(io(format!("run {}", bin.display())))?;
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(20))
    }

    /// Wait until the server answers with its `INFO` line.
    fn wait_ready(&mut self, limit: Duration) -> Result<(), ServerError> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(_)) = child.try_wait()
            {
                break; // exited: report its log
            }
            if let Ok(stream) = TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                let mut line = String::new();
                if BufReader::new(stream).read_line(&mut line).is_ok() && line.starts_with("INFO") {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n");
        self.kill();
        Err(ServerError::NotReady {
            port: self.port,
            secs: limit.as_secs(),
            log: self.log.clone(),
            tail,
        })
    }

    /// `nats://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Where JetStream keeps its data.
    pub fn store_dir(&self) -> &Path {
        &self.store_dir
    }

    /// The server's log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Kill the server (SIGKILL) and reap it; the store dir stays.
    pub fn stop(&mut self) {
        self.kill();
    }

    /// The server process's id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stop the server the way a service manager does: SIGTERM (JetStream flushes its store and
    /// clients are told to reconnect), then SIGKILL if it has not exited within `grace`.
    pub fn terminate(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(pid) = libc::pid_t::try_from(child.id()) {
            // SAFETY: kill(2) with a pid of our own, not yet reaped child.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let start = Instant::now();
        while start.elapsed() < grace {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Start the server again with the same store dir and port.
    pub fn restart(&mut self) -> Result<(), ServerError> {
        self.kill();
        self.spawn()
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        self.kill();
    }
}
