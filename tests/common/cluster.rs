//! A three-node (or n-node) JetStream cluster of the Debian `nats-server` on free loopback
//! ports: each node with its own configuration file, store directory and `server_name`, routes
//! to the others (`cluster { routes }`), and a monitoring port whose `/jsz` is the tests' oracle
//! for where streams live (replicas, leader) — the server's own view, not kiln's. Optionally
//! TLS for clients and routes, with a CA, server and client certificates made by openssl
//! ([`Certs`]). Nodes can be SIGKILLed and started again on the same ports and store.

use super::{Running, free_port};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Certificates made for a test by `openssl`: a CA, a server certificate for 127.0.0.1 and
/// localhost signed by it (used by every node, for clients and routes), a client certificate
/// signed by it, and a second CA that signed nothing the servers use.
pub struct Certs {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub other_ca: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    super::run(Command::new("openssl").current_dir(dir).args(args));
}

impl Certs {
    /// Make them in `dir`.
    pub fn make(dir: &Path) -> Certs {
        let ca = |name: &str| {
            openssl(
                dir,
                &[
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-nodes",
                    "-days",
                    "2",
                    "-subj",
                    &format!("/CN=kiln test {name}"),
                    "-keyout",
                    &format!("{name}.key"),
                    "-out",
                    &format!("{name}.pem"),
                ],
            )
        };
        ca("ca");
        ca("other-ca");
        let leaf = |name: &str, ext: &str| {
            openssl(
                dir,
                &[
                    "req",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-nodes",
                    "-subj",
                    &format!("/CN=kiln test {name}"),
                    "-keyout",
                    &format!("{name}.key"),
                    "-out",
                    &format!("{name}.csr"),
                ],
            );
            std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
            openssl(
                dir,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &format!("{name}.csr"),
                    "-CA",
                    "ca.pem",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-days",
                    "2",
                    "-extfile",
                    &format!("{name}.ext"),
                    "-out",
                    &format!("{name}.pem"),
                ],
            );
        };
        // Routes are TLS too, and each node checks the other's certificate as client and
        // server: one certificate good for both.
        leaf(
            "server",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n",
        );
        leaf("client", "extendedKeyUsage=clientAuth\n");
        Certs {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
            other_ca: dir.join("other-ca.pem"),
        }
    }

    /// `--nats-tls-ca CA --nats-tls-cert CERT --nats-tls-key KEY` for kiln.
    pub fn client_args(&self) -> Vec<std::ffi::OsString> {
        vec![
            "--nats-tls-ca".into(),
            self.ca.clone().into(),
            "--nats-tls-cert".into(),
            self.client_cert.clone().into(),
            "--nats-tls-key".into(),
            self.client_key.clone().into(),
        ]
    }
}

/// One node: its ports, files and process (None while stopped).
pub struct Node {
    pub name: String,
    pub port: u16,
    pub route_port: u16,
    pub monitor_port: u16,
    pub config: PathBuf,
    pub log: PathBuf,
    pub process: Option<Running>,
}

/// The cluster; every node is stopped when it is dropped.
pub struct Cluster {
    pub nodes: Vec<Node>,
    pub certs: Option<Certs>,
    /// The address the nodes listen on for clients.
    pub host: String,
    pub dir: tempfile::TempDir,
}

impl Cluster {
    /// `n` nodes on loopback without TLS, started and with a JetStream meta leader.
    pub fn start(n: usize) -> Cluster {
        Self::start_with(n, false, "127.0.0.1")
    }

    /// `n` nodes with TLS for clients (client certificates required) and routes.
    pub fn start_tls(n: usize) -> Cluster {
        Self::start_with(n, true, "127.0.0.1")
    }

    /// `n` nodes whose client port listens on `host` (routes and monitoring stay on
    /// loopback).
    ///
    /// Free ports are chosen before the nodes bind them, so another process may take one in
    /// between; a node that then cannot bind is not a failure of the test: the cluster is made
    /// again on fresh ports (up to three times).
    pub fn start_with(n: usize, tls: bool, host: &str) -> Cluster {
        let mut attempt = 1;
        loop {
            let mut cluster = Self::configure(n, tls, host);
            let started: Result<(), String> = (0..n).try_for_each(|i| cluster.try_start_node(i));
            match started {
                Ok(()) => {
                    cluster.wait_for_meta_leader(Duration::from_secs(30));
                    return cluster;
                }
                Err(e) if attempt < 3 && e.contains("address already in use") => {
                    eprintln!("cluster start, attempt {attempt}: a port was taken; again: {e}");
                    attempt += 1;
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    /// The nodes' configuration files on fresh free ports, none started.
    fn configure(n: usize, tls: bool, host: &str) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let certs = tls.then(|| Certs::make(dir.path()));
        let ports: Vec<(u16, u16, u16)> = (0..n)
            .map(|_| (free_port(), free_port(), free_port()))
            .collect();
        let mut nodes = Vec::new();
        for (i, (port, route_port, monitor_port)) in ports.iter().copied().enumerate() {
            let name = format!("n{}", i + 1);
            // Routes use TLS through the `tls {}` block of `cluster`; the scheme stays.
            let routes: Vec<String> = ports
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, (_, r, _))| format!("\"nats-route://127.0.0.1:{r}\""))
                .collect();
            let store = dir.path().join(&name);
            let tls_block = |indent: &str| match &certs {
                None => String::new(),
                Some(c) => format!(
                    "{indent}tls {{\n{indent}  cert_file: \"{}\"\n{indent}  key_file: \"{}\"\n{indent}  ca_file: \"{}\"\n{indent}  verify: true\n{indent}  timeout: 5\n{indent}}}\n",
                    c.server_cert.display(),
                    c.server_key.display(),
                    c.ca.display()
                ),
            };
            let config = format!(
                "server_name: {name}\nlisten: \"{host}:{port}\"\nhttp: \"127.0.0.1:{monitor_port}\"\n\
                 jetstream {{\n  store_dir: \"{}\"\n}}\n{}\
                 cluster {{\n  name: kiln-test\n  listen: \"127.0.0.1:{route_port}\"\n  routes: [{}]\n{}}}\n",
                store.display(),
                tls_block(""),
                routes.join(", "),
                tls_block("  "),
            );
            let path = dir.path().join(format!("{name}.conf"));
            std::fs::write(&path, config).unwrap();
            nodes.push(Node {
                log: dir.path().join(format!("{name}.log")),
                name,
                port,
                route_port,
                monitor_port,
                config: path,
                process: None,
            });
        }
        Cluster {
            nodes,
            certs,
            host: host.to_string(),
            dir,
        }
    }

    /// The client URL of node `i`.
    pub fn url(&self, i: usize) -> String {
        let scheme = if self.certs.is_some() { "tls" } else { "nats" };
        format!("{scheme}://{}:{}", self.host, self.nodes[i].port)
    }

    /// Every node's client URL, comma-separated (kiln's `--nats` list).
    pub fn urls(&self) -> String {
        (0..self.nodes.len())
            .map(|i| self.url(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Start node `i` (again), on its ports and store.
    pub fn start_node(&mut self, i: usize) {
        if let Err(e) = self.try_start_node(i) {
            panic!("{e}");
        }
    }

    /// Start node `i`, or say (with its logs) why it exited or did not listen in time.
    fn try_start_node(&mut self, i: usize) -> Result<(), String> {
        let node = &mut self.nodes[i];
        assert!(node.process.is_none(), "{} runs already", node.name);
        // Append: a restart keeps the log of the run before it.
        let mut c = Command::new("/usr/sbin/nats-server");
        c.arg("-c").arg(&node.config).arg("-l").arg(&node.log);
        let stderr = node.log.with_extension("stderr");
        let mut running = Running::spawn(c, &stderr);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", node.monitor_port)).is_err() {
            if let Ok(Some(status)) = running.child.try_wait() {
                return Err(format!(
                    "{} exited ({status}): {}\n{}",
                    node.name,
                    running.log(),
                    std::fs::read_to_string(&node.log).unwrap_or_default()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!("{} did not start", node.name));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        node.process = Some(running);
        Ok(())
    }

    /// SIGKILL node `i`.
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut p) = self.nodes[i].process.take() {
            p.kill9();
        }
    }

    /// The nodes running now.
    pub fn alive(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|i| self.nodes[*i].process.is_some())
            .collect()
    }

    /// `GET /jsz?…` of node `i`'s monitoring port, or None when it does not answer.
    pub fn jsz(&self, i: usize, query: &str) -> Option<serde_json::Value> {
        let out = Command::new("curl")
            .args(["-sS", "--fail", "--max-time", "5"])
            .arg(format!(
                "http://127.0.0.1:{}/jsz?{query}",
                self.nodes[i].monitor_port
            ))
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Wait until every running node names the same JetStream meta leader.
    pub fn wait_for_meta_leader(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let leaders: Vec<Option<String>> = self
                .alive()
                .iter()
                .map(|i| {
                    self.jsz(*i, "")
                        .and_then(|j| j["meta_cluster"]["leader"].as_str().map(str::to_string))
                })
                .collect();
            if leaders.iter().all(|l| l.is_some()) && leaders.windows(2).all(|w| w[0] == w[1]) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no JetStream meta leader after {limit:?}: {leaders:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// What the running nodes report about stream `name` (`/jsz?streams=true&config=true`):
    /// one stream detail per node that holds a copy, as that node sees it.
    pub fn stream_details(&self, name: &str) -> Vec<(usize, serde_json::Value)> {
        let mut out = Vec::new();
        for i in self.alive() {
            let Some(j) = self.jsz(i, "streams=true&config=true") else {
                continue;
            };
            for account in j["account_details"].as_array().into_iter().flatten() {
                for s in account["stream_detail"].as_array().into_iter().flatten() {
                    if s["name"] == name {
                        out.push((i, s.clone()));
                    }
                }
            }
        }
        out
    }

    /// The configured replicas of stream `name`, as the servers hold it (None: no node has it).
    pub fn replicas(&self, name: &str) -> Option<u64> {
        self.stream_details(name)
            .iter()
            .find_map(|(_, s)| s["config"]["num_replicas"].as_u64())
    }

    /// How many messages the stream's leader holds.
    pub fn messages(&self, name: &str) -> Option<u64> {
        let leader = self.leader(name)?;
        self.stream_details(name)
            .into_iter()
            .find(|(i, _)| *i == leader)
            .and_then(|(_, s)| s["state"]["messages"].as_u64())
    }

    /// The index of the node leading stream `name`, when one does.
    pub fn leader(&self, name: &str) -> Option<usize> {
        let leader = self
            .stream_details(name)
            .into_iter()
            .find_map(|(_, s)| s["cluster"]["leader"].as_str().map(str::to_string))?;
        self.nodes.iter().position(|n| n.name == leader)
    }

    /// Wait until stream `name` has a leader and `done` holds for its copies (node index,
    /// stream detail); panics with the nodes' logs after `limit`.
    pub fn wait_for_stream(
        &self,
        name: &str,
        limit: Duration,
        what: &str,
        done: impl Fn(&[(usize, serde_json::Value)]) -> bool,
    ) -> Vec<(usize, serde_json::Value)> {
        let deadline = Instant::now() + limit;
        loop {
            let details = self.stream_details(name);
            if self.leader(name).is_some() && done(&details) {
                return details;
            }
            assert!(
                Instant::now() < deadline,
                "{name}: {what} not reached after {limit:?}: {details:#?}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The nodes' logs, for failure messages.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| {
                let text = std::fs::read_to_string(&n.log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(30).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                format!("--- {} ---\n{}", n.name, tail.join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}
