//! Render children: each template render in its own short-lived process (the kiln binary started
//! with [`CHILD_ARG`]) under an address-space limit, a CPU-time limit and a wall-clock deadline.
//!
//! Fuel bounds most of what a template can do, but not everything: lists that share their items
//! (`{% set b = [a, a] %}` thirty times over) are cheap to build and exponentially large to
//! display, serialize (`tojson`) or compare, and minijinja walks them without charging fuel.
//! In a child such a template costs one process, never the worker: the child is killed at the
//! deadline, or fails to allocate past its address-space limit, and the parent reports which
//! limit, with a place, as a recipe error.
//!
//! The kiln binary calls [`serve_or_enable`] first thing in `main`. Processes that do not (the
//! library's own unit tests, other embedders) render in-process under fuel and the meter only.

use super::diag::{Diagnostic, Kind, Place};
use super::limits::{Limit, Limits, bytes};
use super::render::{Job, LoadedTemplate, Origin, Renderer};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The first argument that makes the kiln binary serve one render request.
pub const CHILD_ARG: &str = "__kiln-render-child";

/// Time a child may take beyond the render timeout (process start, reading templates).
const CHILD_GRACE: Duration = Duration::from_secs(1);

/// Bytes of stderr kept from a child (enough for a panic message).
const STDERR_KEEP: u64 = 16 << 10;

static CHILD_EXE: OnceLock<PathBuf> = OnceLock::new();

/// In the kiln binary, before anything else: serve a render request and exit when started as
/// a render child; otherwise make every later render run in a child of this executable.
pub fn serve_or_enable() {
    if std::env::args_os().nth(1).as_deref() == Some(std::ffi::OsStr::new(CHILD_ARG)) {
        std::process::exit(serve());
    }
    match std::env::current_exe() {
        Ok(exe) => enable(exe),
        Err(e) => tracing::warn!("templates render in-process: cannot find kiln's executable: {e}"),
    }
}

/// Make renders run in children of `exe` (a kiln binary). The first call wins.
pub fn enable(exe: PathBuf) {
    let _ = CHILD_EXE.set(exe);
}

/// The executable render children run, when enabled.
pub(crate) fn child_exe() -> Option<&'static Path> {
    CHILD_EXE.get().map(PathBuf::as_path)
}

/// One render, as the parent sends it.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct Request {
    pub limits: Limits,
    /// Output the parent's earlier renders wrote (towards `limits.max_total_output`).
    pub total_output: u64,
    pub origin: Origin,
    pub job: Job,
    pub context: serde_json::Value,
}

/// What the child answers: the output or the recipe error, and the templates it read.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct Response {
    pub result: Result<String, Diagnostic>,
    pub loaded: BTreeMap<String, LoadedTemplate>,
}

/// Why a child gave no answer.
#[derive(Debug)]
pub(crate) enum Failure {
    /// It crossed a limit that only the process boundary enforces (time, memory, stack).
    Limit(Limit),
    /// It could not be started (no processes left, the executable replaced by an upgrade): a
    /// problem of this host, not of the recipe.
    Spawn(String),
    /// Anything else: it could not start, crashed, or answered nonsense.
    Broken(String),
}

impl Failure {
    /// The recipe error for this failure at `place` (the start of what was rendered: a child
    /// that is killed cannot say where it was).
    pub(crate) fn diagnostic(&self, limits: &Limits, place: Place) -> Diagnostic {
        match self {
            Failure::Limit(limit) => Diagnostic::new(Kind::Limit, limit.describe(limits))
                .at(Some(place))
                .help(limit.help()),
            Failure::Spawn(why) | Failure::Broken(why) => {
                Diagnostic::new(Kind::Template, format!("the render process failed: {why}"))
                    .at(Some(place))
                    .help("this is a bug in kiln, not in the recipe; report it with the recipe")
            }
        }
    }
}

/// Run one render in a child of `exe` and wait for its answer, at most the render timeout plus
/// [`CHILD_GRACE`].
pub(crate) fn run(exe: &Path, request: &Request) -> Result<Response, Failure> {
    let limits = &request.limits;
    let body = serde_json::to_vec(request).map_err(|e| Failure::Broken(e.to_string()))?;
    let mut cmd = Command::new(exe);
    cmd.arg(CHILD_ARG)
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let memory = limits.max_memory;
    let cpu = limits.render_timeout.as_secs().saturating_add(1);
    // SAFETY: between fork and exec only prctl and setrlimit run; both are async-signal-safe
    // system calls that allocate nothing.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(move || {
            // Die with the thread that waits for the child (a worker that stops stops it).
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            set_limit(libc::RLIMIT_AS, memory, memory)?;
            // SIGXCPU at the soft limit says "time"; the hard limit a second later (SIGKILL)
            // only stops a child that ignores it.
            set_limit(libc::RLIMIT_CPU, cpu, cpu.saturating_add(1))?;
            set_limit(libc::RLIMIT_CORE, 0, 0)?;
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| Failure::Spawn(format!("starting {}: {e}", exe.display())))?;
    // The child reads its whole request before it writes anything.
    if let Some(mut stdin) = child.stdin.take() {
        // A child that died early is reported by its exit status below.
        let _ = stdin.write_all(&body);
    }
    // Output is at most the file limit, JSON-escaped (6 bytes per control character at worst),
    // plus the templates read.
    let answer_cap = limits
        .max_file_output
        .saturating_mul(6)
        .saturating_add(limits.max_source_bytes.saturating_mul(16))
        .saturating_add(1 << 20);
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let out_reader = std::thread::spawn(move || read_capped(stdout, answer_cap));
    let err_reader = std::thread::spawn(move || read_capped(stderr, STDERR_KEEP));
    let started = Instant::now();
    let deadline = started + limits.render_timeout + CHILD_GRACE;
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) if Instant::now() >= deadline => {
                timed_out = true;
                let _ = child.kill();
                break child.wait();
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => break Err(e),
        }
    };
    let out = out_reader.join().unwrap_or_default();
    let err = err_reader.join().unwrap_or_default();
    let status = status.map_err(|e| Failure::Broken(format!("waiting for the child: {e}")))?;
    // A child killed (by the CPU hard limit or anyone else) once its time was up ran out of time.
    let killed_late =
        status.signal() == Some(libc::SIGKILL) && started.elapsed() >= limits.render_timeout;
    if timed_out || killed_late {
        return Err(Failure::Limit(Limit::Time));
    }
    if !status.success() {
        return Err(classify(status, &String::from_utf8_lossy(&err.0)));
    }
    if out.1 {
        return Err(Failure::Broken(format!(
            "its answer is larger than {}",
            bytes(answer_cap)
        )));
    }
    serde_json::from_slice(&out.0).map_err(|e| Failure::Broken(format!("its answer: {e}")))
}

/// What a child's failed exit means: which limit, or a crash.
fn classify(status: std::process::ExitStatus, stderr: &str) -> Failure {
    let signal = status.signal();
    if signal == Some(libc::SIGXCPU) {
        return Failure::Limit(Limit::Time);
    }
    if stderr.contains("memory allocation of") || stderr.contains("capacity overflow") {
        return Failure::Limit(Limit::Memory);
    }
    if stderr.contains("has overflowed its stack") {
        return Failure::Limit(Limit::Recursion);
    }
    let last = stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("no message");
    Failure::Broken(format!("{status}: {last}"))
}

/// Lower `resource` to `soft` and `hard` (never above the hard limit the process already has,
/// which only a privileged process could raise).
fn set_limit(resource: libc::__rlimit_resource_t, soft: u64, hard: u64) -> std::io::Result<()> {
    let mut current = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only the struct it is given.
    if unsafe { libc::getrlimit(resource, &mut current) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let hard = hard.min(current.rlim_max);
    let limit = libc::rlimit {
        rlim_cur: soft.min(hard),
        rlim_max: hard,
    };
    // SAFETY: setrlimit reads the struct it is given.
    if unsafe { libc::setrlimit(resource, &limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Read at most `cap` bytes; the flag says whether there was more.
fn read_capped(from: Option<impl Read>, cap: u64) -> (Vec<u8>, bool) {
    let Some(from) = from else {
        return (Vec::new(), false);
    };
    let mut buf = Vec::new();
    let mut limited = from.take(cap.saturating_add(1));
    let _ = limited.read_to_end(&mut buf);
    let over = buf.len() as u64 > cap;
    if over {
        buf.truncate(usize::try_from(cap).unwrap_or(usize::MAX));
        // Drain the rest so that the child is not blocked on a full pipe.
        let _ = std::io::copy(&mut limited.into_inner(), &mut std::io::sink());
    }
    (buf, over)
}

/// The child's side: read a request from stdin, render in-process, answer on stdout.
fn serve() -> i32 {
    let mut body = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut body) {
        eprintln!("render child: reading the request: {e}");
        return 3;
    }
    let request: Request = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("render child: the request is not valid: {e}");
            return 3;
        }
    };
    drop(body);
    let renderer = Renderer::with_origin(request.origin, &request.limits);
    renderer.add_output(request.total_output);
    let result = renderer.render_here(&request.job, &request.context);
    let response = Response {
        result,
        loaded: renderer.loaded(),
    };
    let mut stdout = std::io::stdout().lock();
    let written = serde_json::to_writer(&mut stdout, &response)
        .map_err(std::io::Error::from)
        .and_then(|()| stdout.flush());
    match written {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("render child: writing the answer: {e}");
            3
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_that_cannot_start_is_a_host_problem() {
        let request = Request {
            limits: Limits::default(),
            total_output: 0,
            origin: Origin::Texts(BTreeMap::new()),
            job: Job::Template { name: "x".into() },
            context: serde_json::json!({}),
        };
        let got = run(Path::new("/nonexistent/kiln"), &request);
        assert!(matches!(got, Err(Failure::Spawn(_))), "{got:?}");
    }

    #[test]
    fn exits_say_which_limit() {
        let killed = |signal: i32| std::process::ExitStatus::from_raw(signal);
        let cases = [
            (killed(libc::SIGXCPU), "", Some(Limit::Time)),
            (
                killed(libc::SIGABRT),
                "memory allocation of 1073741824 bytes failed\n",
                Some(Limit::Memory),
            ),
            (
                killed(libc::SIGSEGV),
                "\nthread 'main' has overflowed its stack\nfatal runtime error: stack overflow\n",
                Some(Limit::Recursion),
            ),
            (killed(libc::SIGSEGV), "", None),
            (
                std::process::ExitStatus::from_raw(3 << 8),
                "render child: …",
                None,
            ),
        ];
        for (status, stderr, want) in cases {
            match (classify(status, stderr), want) {
                (Failure::Limit(got), Some(want)) => assert_eq!(got, want, "{status}"),
                (Failure::Broken(_), None) => {}
                (got, want) => panic!("{status} {stderr:?}: {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn answers_are_read_up_to_a_cap() {
        let (all, over) = read_capped(Some(&b"12345"[..]), 5);
        assert_eq!((all.as_slice(), over), (&b"12345"[..], false));
        let (cut, over) = read_capped(Some(&b"123456"[..]), 5);
        assert_eq!((cut.as_slice(), over), (&b"12345"[..], true));
    }
}
