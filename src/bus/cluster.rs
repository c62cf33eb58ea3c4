//! kiln on a NATS cluster: the list of seed servers a client connects to ([`server_addrs`]),
//! TLS to the servers ([`TlsFiles`]), how many replicas the streams and buckets kiln creates get
//! ([`default_replicas`], [`Bus::replicas`]) and how an existing stream is scaled up without
//! losing anything and never scaled down ([`merged_replicas`]), which node leads each of them
//! ([`ClusterReport`], `kiln status --cluster`), and what to say when JetStream cannot answer
//! ([`Bus::unavailable`]: no quorum, no JetStream, a node unreachable).

use super::{BLOB_BUCKET, BUILD_BUCKET, Bus, BusError, STAGE_BUCKET, STATE_BUCKET, STREAM};
use async_nats::ServerAddr;
use async_nats::jetstream::stream;
use std::path::{Path, PathBuf};

/// The most replicas NATS JetStream keeps of a stream (and what kiln asks for on a cluster of
/// three or more nodes).
pub const MAX_REPLICAS: usize = 3;

/// How long a stream just scaled up may take to elect its leader and bring the new copies up to
/// date before kiln says it has no quorum.
pub const SETTLE_TIME: std::time::Duration = std::time::Duration::from_secs(60);

/// How often workers check that the `KILN` stream answers ([`Bus::watch_stream`]).
pub const QUORUM_CHECK: std::time::Duration = std::time::Duration::from_secs(5);

/// Environment variable and flag of the replica count (`kiln up`, `kiln worker`, `kiln agent`).
pub const REPLICAS_ENV: &str = "KILN_REPLICAS";

/// The streams kiln creates, by what they hold: the event stream, the KV buckets' streams (stage
/// records, handed-on states, the build index) and the blob object store's stream.
pub fn kiln_streams() -> [(&'static str, String); 5] {
    [
        ("events", STREAM.to_string()),
        ("stage records", format!("KV_{STAGE_BUCKET}")),
        ("states", format!("KV_{STATE_BUCKET}")),
        ("build index", format!("KV_{BUILD_BUCKET}")),
        ("blobs", format!("OBJ_{BLOB_BUCKET}")),
    ]
}

/// The seed servers of a `--nats` value: one URL or several separated by commas
/// (`nats://a:4222,nats://b:4222`); each may also be a bare `host:port`. async-nats would read a
/// comma-separated `&str` as one URL, so kiln parses the list itself; the client then connects
/// to whichever listed server answers, and learns the rest of the cluster from it.
pub fn server_addrs(urls: &str) -> Result<Vec<ServerAddr>, BusError> {
    let mut out = Vec::new();
    for url in urls.split(',').map(str::trim) {
        if url.is_empty() {
            continue;
        }
        let addr: ServerAddr = url.parse().map_err(|e: std::io::Error| BusError::BadUrl {
            url: crate::net::redact(url).into_owned(),
            message: e.to_string(),
        })?;
        out.push(addr);
    }
    if out.is_empty() {
        return Err(BusError::BadUrl {
            url: urls.to_string(),
            message: "no server URL in it".into(),
        });
    }
    Ok(out)
}

/// TLS material for the connection to the servers: a private CA that signed the servers'
/// certificates, and this client's certificate and key when the servers ask for one (`verify:
/// true` in their `tls {}` block). PEM files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl TlsFiles {
    /// True when any file is given: the connection must then use TLS.
    pub fn any(&self) -> bool {
        self.ca.is_some() || self.cert.is_some() || self.key.is_some()
    }

    /// Check that the files are there and readable, so that a wrong path is said as such
    /// instead of as a failed handshake.
    pub fn check(&self) -> Result<(), BusError> {
        if self.cert.is_some() != self.key.is_some() {
            return Err(BusError::TlsPair);
        }
        let files = [
            ("CA certificate (--nats-tls-ca)", &self.ca),
            ("client certificate (--nats-tls-cert)", &self.cert),
            ("client key (--nats-tls-key)", &self.key),
        ];
        for (what, path) in files {
            if let Some(path) = path {
                readable(what, path)?;
            }
        }
        Ok(())
    }

    /// `options` with these files applied.
    pub(crate) fn apply(
        &self,
        mut options: async_nats::ConnectOptions,
    ) -> async_nats::ConnectOptions {
        if let Some(ca) = &self.ca {
            options = options.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        options
    }
}

fn readable(what: &'static str, path: &Path) -> Result<(), BusError> {
    std::fs::File::open(path)
        .map(drop)
        .map_err(|source| BusError::TlsFile {
            what,
            path: path.to_path_buf(),
            source,
        })
}

/// The replicas kiln gives what it creates when no count is given: the number of servers in the
/// cluster, at most [`MAX_REPLICAS`]. The signal is the server's INFO: `connect_urls` lists the
/// client URLs of every server in the cluster that the connected one has a route to (itself
/// included; a server outside a cluster sends none). A node that is down when the count is taken
/// is missed, so a worker started then asks for fewer; that never scales anything down (see
/// [`merged_replicas`]), and the next start with the whole cluster up scales up.
pub fn default_replicas(info: &async_nats::ServerInfo) -> usize {
    let mut urls: Vec<&String> = info.connect_urls.iter().collect();
    urls.sort();
    urls.dedup();
    urls.len().clamp(1, MAX_REPLICAS)
}

/// The replicas to configure on a stream that has `existing` and for which kiln wants `wanted`:
/// the larger. kiln scales up (NATS copies what is stored to the new peers, nothing is lost)
/// and never scales down what an operator raised by hand.
pub fn merged_replicas(existing: usize, wanted: usize) -> usize {
    existing.max(wanted).max(1)
}

/// Where one of kiln's streams is kept: its replicas and which node leads it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StreamPlacement {
    /// What the stream holds (`events`, `stage records`, `states`, `build index`, `blobs`).
    pub role: &'static str,
    pub stream: String,
    /// Configured replicas; `None` when the stream could not be read.
    pub replicas: Option<usize>,
    /// The cluster's name, when the server is in one.
    pub cluster: Option<String>,
    /// The server that leads the stream (`None`: no leader, e.g. no quorum).
    pub leader: Option<String>,
    /// The other servers holding a copy, with whether each is current.
    pub peers: Vec<Peer>,
    pub messages: Option<u64>,
    pub bytes: Option<u64>,
    /// Why the stream could not be read.
    pub error: Option<String>,
}

/// A follower of a stream.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Peer {
    pub name: String,
    pub current: bool,
    pub offline: bool,
    /// Operations behind the leader.
    pub lag: Option<u64>,
}

/// `kiln status --cluster`: the server this client is connected to and where each stream of
/// kiln's is kept.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClusterReport {
    /// The server this client talks to.
    pub server: String,
    pub cluster: Option<String>,
    /// Client URLs of the servers in the cluster, as the connected server announces them.
    pub servers: Vec<String>,
    /// What kiln's workers create when no --replicas is given here.
    pub default_replicas: usize,
    pub streams: Vec<StreamPlacement>,
}

impl ClusterReport {
    /// One line per stream: `events  KILN  R3  leader n1  followers n2 (current), n3 (lag 4)`.
    pub fn lines(&self) -> Vec<String> {
        let mut out = vec![format!(
            "connected to {} (cluster {}, {} server(s) known: {})",
            self.server,
            self.cluster.as_deref().unwrap_or("-"),
            self.servers.len().max(1),
            if self.servers.is_empty() {
                "-".to_string()
            } else {
                self.servers.join(" ")
            }
        )];
        for s in &self.streams {
            if let Some(e) = &s.error {
                out.push(format!("{:<14} {:<16} {e}", s.role, s.stream));
                continue;
            }
            let peers: Vec<String> = s
                .peers
                .iter()
                .map(|p| {
                    let state = if p.offline {
                        "offline".to_string()
                    } else if p.current {
                        "current".to_string()
                    } else {
                        format!("lag {}", p.lag.unwrap_or(0))
                    };
                    format!("{} ({state})", p.name)
                })
                .collect();
            out.push(format!(
                "{:<14} {:<16} R{} leader {} followers {}",
                s.role,
                s.stream,
                s.replicas.unwrap_or(0),
                s.leader.as_deref().unwrap_or("NONE (no quorum)"),
                if peers.is_empty() {
                    "-".to_string()
                } else {
                    peers.join(", ")
                }
            ));
        }
        out
    }
}

impl Bus {
    /// The replicas of what this connection creates: the count given at connect
    /// ([`super::ConnectOptions::replicas`]), else [`default_replicas`].
    pub fn replicas(&self) -> usize {
        self.replicas
            .unwrap_or_else(|| default_replicas(&self.client().server_info()))
    }

    /// `config` (of a stream that may exist) with the replicas kiln asks for, merged with what
    /// the stream has (see [`merged_replicas`]).
    pub(crate) fn with_replicas(
        &self,
        mut config: stream::Config,
        existing: Option<&stream::Config>,
    ) -> stream::Config {
        let existing = existing.map_or(0, |c| c.num_replicas);
        config.num_replicas = merged_replicas(existing, self.replicas());
        config
    }

    /// Scale the stream `name` (made by someone else's code, e.g. the object store's) up to
    /// [`Bus::replicas`] when it has fewer; a no-op otherwise.
    pub(crate) async fn scale_up(&self, name: &str) -> Result<(), BusError> {
        let mut stream = self
            .jetstream()
            .get_stream(name)
            .await
            .map_err(|e| self.unavailable(name, format!("look up stream {name}"), e))?;
        let info = stream
            .info()
            .await
            .map_err(|e| self.unavailable(name, format!("read stream {name}"), e))?;
        let config = info.config.clone();
        let wanted = merged_replicas(config.num_replicas, self.replicas());
        if wanted == config.num_replicas {
            return Ok(());
        }
        tracing::info!(
            "scaling stream {name} from {} to {wanted} replicas",
            config.num_replicas
        );
        self.jetstream()
            .update_stream(stream::Config {
                num_replicas: wanted,
                ..config
            })
            .await
            .map_err(|e| {
                self.unavailable(name, format!("scale stream {name} to {wanted} replicas"), e)
            })?;
        self.settle(name, wanted).await
    }

    /// Wait until stream `name`, just scaled to `replicas`, has a leader and every new copy is
    /// current: NATS elects the stream's leader again after a scale-up, and requests about the
    /// stream time out until it has one. Gives up with [`BusError::NoQuorum`] after
    /// [`SETTLE_TIME`].
    pub(crate) async fn settle(&self, name: &str, replicas: usize) -> Result<(), BusError> {
        let deadline = tokio::time::Instant::now() + SETTLE_TIME;
        loop {
            let last = match self.jetstream().get_stream(name).await {
                Ok(mut s) => match s.info().await {
                    Ok(info) => match &info.cluster {
                        Some(c)
                            if c.leader.is_some()
                                && c.replicas.len() + 1 >= replicas
                                && c.replicas.iter().all(|p| p.current) =>
                        {
                            return Ok(());
                        }
                        // A single server reports no peers: nothing to wait for.
                        None => return Ok(()),
                        Some(c) => {
                            format!(
                                "leader {}, {} of {} copies current",
                                c.leader.as_deref().unwrap_or("none"),
                                c.replicas.iter().filter(|p| p.current).count()
                                    + usize::from(c.leader.is_some()),
                                replicas
                            )
                        }
                    },
                    Err(e) => e.to_string(),
                },
                Err(e) => e.to_string(),
            };
            if tokio::time::Instant::now() > deadline {
                return Err(BusError::NoQuorum {
                    stream: name.to_string(),
                    server: self.client().server_info().server_name,
                    what: format!("see stream {name} settle on {replicas} replicas"),
                    message: last,
                });
            }
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
    }

    /// Whether the cluster's JetStream metadata leader answers: a reply to `$JS.API.INFO` that
    /// is not an error. (async-nats cannot parse 2.9's account info, so only its `error` field
    /// is looked at.) While it answers, a stream that does not is electing its leader, e.g.
    /// right after another worker created it; without it the cluster has no quorum at all.
    pub(crate) async fn meta_answers(&self) -> bool {
        let request = self.client().request("$JS.API.INFO", bytes::Bytes::new());
        match tokio::time::timeout(std::time::Duration::from_secs(3), request).await {
            Ok(Ok(reply)) => !String::from_utf8_lossy(&reply.payload).contains("\"error\""),
            _ => false,
        }
    }

    /// Run `setup` (creating or updating a stream or bucket) and, when it fails for want of a
    /// quorum while the cluster's metadata leader answers ([`Bus::meta_answers`]), run it again,
    /// up to four times: streams that workers on several hosts create at the same moment take
    /// a few seconds to elect their leaders. Without a metadata leader the error is returned
    /// at once.
    pub(crate) async fn patiently<T, F, Fut>(&self, setup: F) -> Result<T, BusError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, BusError>>,
    {
        let mut attempt = 1;
        loop {
            match setup().await {
                Err(e @ BusError::NoQuorum { .. }) if attempt < 4 && self.meta_answers().await => {
                    tracing::info!(
                        "{}; the cluster's metadata leader answers, so trying again",
                        crate::error::chain_text(&e)
                    );
                    attempt += 1;
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
                other => return other,
            }
        }
    }

    /// Watch, every [`QUORUM_CHECK`], that stream `name` answers, and log when it stops (as
    /// [`BusError::NoQuorum`] or whatever the cause is) and when it answers again. A worker's
    /// pulls cannot tell a stream without a leader from an idle one (both just bring no
    /// message), so without this a worker would wait in silence. Runs until dropped.
    pub async fn watch_stream(&self, name: &str) -> std::convert::Infallible {
        let mut failing = false;
        loop {
            tokio::time::sleep(QUORUM_CHECK).await;
            let answer = async {
                let mut s = self
                    .jetstream()
                    .get_stream(name)
                    .await
                    .map_err(|e| e.to_string())?;
                let info = s.info().await.map_err(|e| e.to_string())?;
                // A follower answers too, naming no leader.
                match &info.cluster {
                    Some(c) if c.leader.is_none() => Err("no leader elected".to_string()),
                    _ => Ok(()),
                }
            };
            let result = match tokio::time::timeout(QUORUM_CHECK, answer).await {
                Ok(r) => r,
                Err(_) => Err(format!("timed out after {} s", QUORUM_CHECK.as_secs())),
            };
            match (result, failing) {
                (Err(e), false) => {
                    let error = self.unavailable(name, format!("read stream {name}"), e);
                    tracing::warn!("{}", crate::error::chain_text(&error));
                    failing = true;
                }
                (Ok(()), true) => {
                    tracing::info!("stream {name} answers again");
                    failing = false;
                }
                _ => {}
            }
        }
    }

    /// Where each of kiln's streams is kept (`kiln status --cluster`).
    pub async fn cluster_report(&self) -> ClusterReport {
        let info = self.client().server_info();
        let mut streams = Vec::new();
        for (role, name) in kiln_streams() {
            streams.push(self.placement(role, &name).await);
        }
        ClusterReport {
            server: if info.server_name.is_empty() {
                format!("{}:{}", info.host, info.port)
            } else {
                info.server_name.clone()
            },
            cluster: info.cluster.clone(),
            servers: info.connect_urls.clone(),
            default_replicas: default_replicas(&info),
            streams,
        }
    }

    async fn placement(&self, role: &'static str, name: &str) -> StreamPlacement {
        let mut out = StreamPlacement {
            role,
            stream: name.to_string(),
            replicas: None,
            cluster: None,
            leader: None,
            peers: Vec::new(),
            messages: None,
            bytes: None,
            error: None,
        };
        let info = match self.jetstream().get_stream(name).await {
            Ok(mut s) => s
                .info()
                .await
                .cloned()
                .map_err(|e| self.unavailable(name, format!("read stream {name}"), e)),
            Err(e) => Err(self.unavailable(name, format!("look up stream {name}"), e)),
        };
        match info {
            Ok(info) => {
                out.replicas = Some(info.config.num_replicas.max(1));
                out.messages = Some(info.state.messages);
                out.bytes = Some(info.state.bytes);
                if let Some(c) = info.cluster {
                    out.cluster = c.name;
                    out.leader = c.leader;
                    out.peers = c
                        .replicas
                        .into_iter()
                        .map(|p| Peer {
                            name: p.name,
                            current: p.current,
                            offline: p.offline,
                            lag: p.lag,
                        })
                        .collect();
                }
            }
            Err(e) => out.error = Some(crate::error::chain_text(&e)),
        }
        out
    }

    /// [`BusError::NoQuorum`] for stream `name`, whose info a replica answered with no leader
    /// named (NATS lets a replica answer for a leaderless stream; what it holds may be behind).
    pub(crate) fn no_leader(&self, name: &str, what: &str) -> BusError {
        BusError::NoQuorum {
            stream: name.to_string(),
            server: self.client().server_info().server_name,
            what: what.to_string(),
            message: "a replica answered, naming no leader".into(),
        }
    }

    /// The error for a JetStream request about `stream` that failed with `error`, naming the
    /// real cause: a server without JetStream, a stream that does not exist, or — when the
    /// request timed out, found no responder, or the server said "JetStream system temporarily
    /// unavailable" (10008) — a stream (or the cluster's metadata) without a quorum of nodes
    /// up to elect a leader.
    pub(crate) fn unavailable<E: std::fmt::Display>(
        &self,
        stream: &str,
        what: impl Into<String>,
        error: E,
    ) -> BusError {
        let what = what.into();
        let message = error.to_string();
        let info = self.client().server_info();
        let server = if info.server_name.is_empty() {
            format!("{}:{}", info.host, info.port)
        } else {
            info.server_name.clone()
        };
        if !info.jetstream {
            return BusError::NoJetStream { server, what };
        }
        if is_unavailable(&message) {
            return BusError::NoQuorum {
                stream: stream.to_string(),
                server,
                what,
                message,
            };
        }
        BusError::Nats { what, message }
    }
}

/// True when a JetStream API error means nobody could answer for the stream: the request timed
/// out, had no responders (503), or the server answered 10008 "JetStream system temporarily
/// unavailable" — what NATS says while a stream or the cluster's metadata has no leader.
pub fn is_unavailable(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("timed out")
        || m.contains("no responders")
        || m.contains("temporarily unavailable")
        || m.contains("10008")
        || m.contains("jetstream not in clustered mode")
        || m.contains("no suitable peers")
        || m.contains("insufficient resources")
        || m.contains("no leader")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_lists_parse_and_name_a_bad_url() {
        let cases: [(&str, Result<usize, &str>); 6] = [
            ("nats://127.0.0.1:4222", Ok(1)),
            ("nats://a:1,nats://b:2, tls://c:3", Ok(3)),
            ("127.0.0.1:4222,127.0.0.1:4223", Ok(2)),
            ("nats://u:secret@a:1,,", Ok(1)),
            ("nats://a:1,http://b:2", Err("http://b:2")),
            (" , ", Err("no server URL")),
        ];
        for (text, want) in cases {
            match (server_addrs(text), want) {
                (Ok(addrs), Ok(n)) => assert_eq!(addrs.len(), n, "{text}"),
                (Err(e), Err(needle)) => {
                    let shown = e.to_string();
                    assert!(shown.contains(needle), "{text}: {shown}");
                    assert!(!shown.contains("secret"), "{shown}");
                }
                (got, _) => panic!("{text}: {got:?}"),
            }
        }
        let e = server_addrs("nats://a:1,nats://u:pw@b:notaport")
            .unwrap_err()
            .to_string();
        assert!(e.contains("b:notaport") && !e.contains("pw"), "{e}");
    }

    #[test]
    fn replicas_follow_the_cluster_and_never_go_down() {
        let info = |urls: &[&str]| async_nats::ServerInfo {
            connect_urls: urls.iter().map(|u| u.to_string()).collect(),
            ..Default::default()
        };
        assert_eq!(default_replicas(&info(&[])), 1);
        assert_eq!(default_replicas(&info(&["a:1"])), 1);
        assert_eq!(default_replicas(&info(&["a:1", "b:1", "a:1"])), 2);
        assert_eq!(
            default_replicas(&info(&["a:1", "b:1", "c:1", "d:1", "e:1"])),
            3
        );
        // (existing, wanted) -> configured
        for ((existing, wanted), want) in [((0, 1), 1), ((1, 3), 3), ((3, 1), 3), ((5, 3), 5)] {
            assert_eq!(merged_replicas(existing, wanted), want);
        }
    }

    #[test]
    fn unavailable_errors_are_told_apart() {
        for m in [
            "timed out: didn't receive any response",
            "jetstream error: JetStream system temporarily unavailable (code 503, error code 10008)",
            "no responders",
        ] {
            assert!(is_unavailable(m), "{m}");
        }
        assert!(!is_unavailable(
            "jetstream error: stream not found (code 404, error code 10059)"
        ));
    }
}
