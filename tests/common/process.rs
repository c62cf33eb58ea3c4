//! Running commands and guarding child processes: [`output`] and [`run`] for commands that
//! finish, [`Running`] for the ones that must not outlive the test, [`free_port`] and [`curl`]
//! for what the tests talk to.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Run `cmd` to its end and return what it printed, whatever its exit status; panics naming the
/// command when it cannot be started (a tool that is not installed, say).
pub fn output(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("{cmd:?} could not run ({e}); is it installed?"))
}

/// Panics unless `out` (what `cmd` printed) is a success, with the command, its exit status,
/// stdout and stderr; returns stdout.
pub fn succeeded(cmd: &Command, out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Run `cmd`, which must succeed (see [`succeeded`]); its stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = output(cmd);
    succeeded(cmd, &out)
}

/// `curl -sS --fail ARGS`, which must succeed; the body it fetched. Panics with the arguments and
/// curl's message otherwise.
pub fn curl(args: &[&str]) -> Vec<u8> {
    let out = output(Command::new("curl").args(["-sS", "--fail"]).args(args));
    assert!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A free loopback TCP port (free when asked; bind it soon).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The one guard for child processes: a child stopped when dropped, however the test ends —
/// SIGTERM, then SIGKILL if it is still there after 10 s — and always reaped.
pub struct Running {
    pub child: Child,
    /// Where its stderr goes, when [`Running::spawn`] chose.
    log: Option<PathBuf>,
}

impl Running {
    /// Guard a child already started.
    pub fn new(child: Child) -> Running {
        Running { child, log: None }
    }

    /// Start `cmd` with stdout discarded and stderr written to `log` (created afresh).
    pub fn spawn(mut cmd: Command, log: &Path) -> Running {
        let f = std::fs::File::create(log).expect("log file");
        let child = cmd
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        Running {
            child,
            log: Some(log.to_path_buf()),
        }
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the child wrote to its log so far (empty without one).
    pub fn log(&self) -> String {
        self.log
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // SAFETY: kill(2) with the pid of our own child, not yet reaped.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill9();
    }
}

/// Whether the tests run as root (tools such as `systemd-dissect` need loop devices).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
