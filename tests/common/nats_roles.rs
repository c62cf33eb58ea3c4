//! A `nats-server` running kiln's reference role configuration (docs/nats/kiln-roles.conf) on a
//! free loopback port with JetStream in a temp dir, and NATS clients that log in as a role and
//! collect what the server refuses.

use kiln::bus::{Bus, PrivateServer};
use std::time::Duration;

/// A user of the reference configuration and the password the tests give it.
#[derive(Debug, Clone, Copy)]
pub struct Role {
    pub user: &'static str,
    pub password: &'static str,
    /// The variable the reference configuration reads the password from.
    pub variable: &'static str,
}

pub const CI: Role = Role {
    user: "ci",
    password: "ci-test-password",
    variable: "KILN_NATS_CI_PASSWORD",
};
pub const WORKER: Role = Role {
    user: "worker",
    password: "worker-test-password",
    variable: "KILN_NATS_WORKER_PASSWORD",
};
pub const PUBLISHER: Role = Role {
    user: "publisher",
    password: "publisher-test-password",
    variable: "KILN_NATS_PUBLISHER_PASSWORD",
};
pub const AGENT_HV_01: Role = Role {
    user: "agent-hv-01",
    password: "hv-01-test-password",
    variable: "KILN_NATS_AGENT_HV_01_PASSWORD",
};
pub const AGENT_HV_02: Role = Role {
    user: "agent-hv-02",
    password: "hv-02-test-password",
    variable: "KILN_NATS_AGENT_HV_02_PASSWORD",
};
pub const RELEASE: Role = Role {
    user: "release",
    password: "release-test-password",
    variable: "KILN_NATS_RELEASE_PASSWORD",
};
pub const ADMIN: Role = Role {
    user: "admin",
    password: "admin-test-password",
    variable: "KILN_NATS_ADMIN_PASSWORD",
};
pub const ROLES: [Role; 7] = [
    CI,
    WORKER,
    PUBLISHER,
    AGENT_HV_01,
    AGENT_HV_02,
    RELEASE,
    ADMIN,
];

impl Role {
    /// `--nats-user USER --nats-password PASSWORD`
    pub fn args(&self) -> [&'static str; 4] {
        ["--nats-user", self.user, "--nats-password", self.password]
    }
}

/// The server and the directory of its configuration.
pub struct RolesServer {
    pub server: PrivateServer,
    _dir: tempfile::TempDir,
}

impl RolesServer {
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// The server's log (it logs every refusal: `Publish Violation - User "ci", Subject "…"`).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.server.log_path()).unwrap_or_default()
    }
}

/// Start nats-server with the reference configuration as shipped: the test only puts the
/// password variables in front of it (the server reads them from its environment otherwise);
/// the listen address, port and JetStream directory are PrivateServer's command-line flags,
/// which take precedence over any in a configuration file.
pub fn start_roles_server() -> RolesServer {
    let dir = tempfile::tempdir().expect("temp dir");
    let reference = std::fs::read_to_string(super::root().join("docs/nats/kiln-roles.conf"))
        .expect("docs/nats/kiln-roles.conf");
    let mut conf = String::from("# test passwords\n");
    for r in ROLES {
        conf.push_str(&format!("{}: \"{}\"\n", r.variable, r.password));
    }
    conf.push_str(&reference);
    let path = dir.path().join("server.conf");
    std::fs::write(&path, conf).expect("write server.conf");
    let path = path.to_str().expect("UTF-8 temp path").to_string();
    let server = PrivateServer::start_with_args(&["-c", &path]).expect("start nats-server");
    RolesServer { server, _dir: dir }
}

/// A connection as `role`, its JetStream requests timing out after `timeout` (a refused
/// request has no answer and waits for that long), and the server's error messages for it.
pub async fn connect_as(
    url: &str,
    role: Role,
    timeout: Duration,
) -> (Bus, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let client = async_nats::ConnectOptions::with_user_and_password(
        role.user.to_string(),
        role.password.to_string(),
    )
    .custom_inbox_prefix(format!("_INBOX.{}", role.user))
    .event_callback(move |event| {
        let tx = tx.clone();
        async move {
            if let async_nats::Event::ServerError(e) = event {
                let _ = tx.send(e.to_string());
            }
        }
    })
    .connect(url)
    .await
    .unwrap_or_else(|e| panic!("connect to {url} as {}: {e}", role.user));
    let js = async_nats::jetstream::ContextBuilder::new()
        .timeout(timeout)
        .build(client.clone());
    (Bus::from_parts(client, js), rx)
}

/// The next server error within 5 s.
pub async fn next_error(rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>) -> String {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("the server reported no error within 5 s")
        .expect("the error channel closed")
}

/// Wait until the workers have created the `KILN` stream (a submitter may not create it).
pub async fn wait_for_stream(url: &str) {
    let (bus, _) = connect_as(url, CI, Duration::from_secs(2)).await;
    let start = std::time::Instant::now();
    while bus.jetstream().get_stream(kiln::bus::STREAM).await.is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the workers did not create the stream within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
