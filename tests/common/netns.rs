//! A separate host for a test: a network namespace (`ip netns`) joined to this host by a veth
//! pair with a private /30 (`10.254.N.1` on this side, `10.254.N.2` inside; N from the test's
//! process id, so parallel test runs do not collide), and a default route back through this
//! side. A process run inside ([`Netns::command`]) shares no loopback with the test or with
//! another namespace: it reaches only what listens on this host's addresses. Everything is
//! deleted when the [`Netns`] is dropped.

use std::process::Command;

pub struct Netns {
    pub name: String,
    /// This side's interface and address (what processes inside connect to).
    pub host_if: String,
    pub host_ip: String,
    /// The address inside the namespace.
    pub inner_ip: String,
}

fn ip(args: &[&str]) {
    super::run(Command::new("ip").args(args));
}

impl Netns {
    /// Namespace number `index` (0 to 3) of this test process.
    pub fn new(index: u32) -> Netns {
        let pid = std::process::id();
        let n = (pid % 60) * 4 + index;
        let name = format!("kiln-t{pid}-{index}");
        let host_if = format!("kt{}h{index}", pid % 100_000);
        let inner_if = format!("kt{}n{index}", pid % 100_000);
        let host_ip = format!("10.254.{n}.1");
        let inner_ip = format!("10.254.{n}.2");
        ip(&["netns", "add", &name]);
        // From here on, dropping it cleans up whatever was made.
        let ns = Netns {
            name: name.clone(),
            host_if: host_if.clone(),
            host_ip: host_ip.clone(),
            inner_ip: inner_ip.clone(),
        };
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &inner_if, "netns", &name,
        ]);
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        let inside = |args: &[&str]| {
            let mut full = vec!["netns", "exec", &name, "ip"];
            full.extend_from_slice(args);
            ip(&full)
        };
        inside(&["addr", "add", &format!("{inner_ip}/30"), "dev", &inner_if]);
        inside(&["link", "set", &inner_if, "up"]);
        inside(&["link", "set", "lo", "up"]);
        inside(&["route", "add", "default", "via", &host_ip]);
        ns
    }

    /// `program` to be run inside the namespace.
    pub fn command(&self, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the pair, and with it this end.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

impl Netns {
    /// [`super::kiln`] run inside the namespace.
    pub fn kiln(&self, home: &std::path::Path) -> Command {
        let mut c = self.command(std::path::Path::new(env!("CARGO_BIN_EXE_kiln")));
        c.current_dir(super::root());
        for (var, _) in std::env::vars_os() {
            if var.to_string_lossy().starts_with("KILN_") {
                c.env_remove(var);
            }
        }
        c.env("KILN_HOME", home);
        c
    }
}
