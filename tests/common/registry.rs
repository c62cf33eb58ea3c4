//! A real OCI registry for tests: Debian's `docker-registry` (distribution 2.8) on a free
//! loopback port, its storage in a temp dir, stopped when dropped.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RegistryServer {
    pub child: Child,
    pub port: u16,
    /// Holds `data/` (the storage), `config.yml` and `registry.log`.
    pub root: tempfile::TempDir,
}

impl Drop for RegistryServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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
    let server = RegistryServer { child, port, root };
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
