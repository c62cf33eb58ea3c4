//! Template rendering: a minijinja environment whose only view of the world is the recipe's
//! context and template files under its roots (the recipe's own directory and the project's
//! `templates/`). Undefined variables are errors; every template loaded is recorded so that it
//! counts towards the build's inputs. Every render runs under the [`Limits`] it was made with:
//! minijinja's fuel and recursion limit bound work, memory and nesting; a [`Meter`] bounds the
//! output (per render and in total) and the wall-clock time, checked at every write, every
//! `{{ … }}` and every template load.

use super::diag::{Diagnostic, Kind, Place, Pos};
use super::limits::{Limit, Limits, read_bounded};
use minijinja::{AutoEscape, Environment, UndefinedBehavior};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

/// Templates kiln ships, used when neither the recipe's directory nor the project's `templates/`
/// has a file of that name (so a project overrides any of them by adding its own).
pub const BUILTIN_TEMPLATES: &[(&str, &str)] = &[
    (
        "busybox/init.sh.j2",
        include_str!("../../templates/busybox/init.sh.j2"),
    ),
    (
        "busybox/passwd.j2",
        include_str!("../../templates/busybox/passwd.j2"),
    ),
    (
        "busybox/group.j2",
        include_str!("../../templates/busybox/group.j2"),
    ),
    (
        "busybox/fstab.j2",
        include_str!("../../templates/busybox/fstab.j2"),
    ),
    (
        "busybox/applets.txt",
        include_str!("../../templates/busybox/applets.txt"),
    ),
    (
        "debian/hosts.j2",
        include_str!("../../templates/debian/hosts.j2"),
    ),
    (
        "debian/fstab.j2",
        include_str!("../../templates/debian/fstab.j2"),
    ),
    (
        "debian/dhcp.network.j2",
        include_str!("../../templates/debian/dhcp.network.j2"),
    ),
    (
        "debian/ssh-host-keys.service.j2",
        include_str!("../../templates/debian/ssh-host-keys.service.j2"),
    ),
    (
        "debian/kiln-verify.service.j2",
        include_str!("../../templates/debian/kiln-verify.service.j2"),
    ),
    (
        "debian/kiln-verify.sh.j2",
        include_str!("../../templates/debian/kiln-verify.sh.j2"),
    ),
];

/// The built-in template of that name.
pub fn builtin_template(name: &str) -> Option<&'static str> {
    BUILTIN_TEMPLATES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, text)| *text)
}

/// The directories templates may be read from, in lookup order.
#[derive(Debug, Clone)]
pub struct TemplateRoots {
    roots: Vec<PathBuf>,
}

/// A template file that was read: its root-relative name, where it is and its text.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LoadedTemplate {
    pub path: PathBuf,
    pub text: String,
}

impl TemplateRoots {
    /// Roots that exist, canonicalized (so symlinks cannot be used to leave them).
    pub fn new(candidates: impl IntoIterator<Item = PathBuf>) -> Self {
        let mut roots = Vec::new();
        for c in candidates {
            if let Ok(real) = c.canonicalize()
                && real.is_dir()
                && !roots.contains(&real)
            {
                roots.push(real);
            }
        }
        TemplateRoots { roots }
    }

    pub fn roots(&self) -> &[PathBuf] {
        &self.roots
    }

    /// Find a template by name. `Ok(None)` when no root has it; an error when the name tries to
    /// leave its root (absolute, `..`, or a symlink pointing outside).
    pub fn find(&self, name: &str) -> Result<Option<PathBuf>, String> {
        let rel = Path::new(name);
        if rel.is_absolute()
            || rel
                .components()
                .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(format!(
                "template name `{name}` leaves the template roots; use a path relative to the \
                 recipe's directory or templates/ without `..`"
            ));
        }
        for root in &self.roots {
            let candidate = root.join(rel);
            let Ok(real) = candidate.canonicalize() else {
                continue;
            };
            if !real.starts_with(root) {
                return Err(format!(
                    "template `{name}` resolves to {} outside its root {}",
                    real.display(),
                    root.display()
                ));
            }
            if real.is_file() {
                return Ok(Some(real));
            }
        }
        Ok(None)
    }
}

/// The output and time one renderer's renders have used, against its limits. Shared by the
/// environment's formatter and loader and the output writer of the render under way.
#[derive(Debug)]
struct Meter {
    limits: Limits,
    state: Mutex<MeterState>,
}

#[derive(Debug, Default)]
struct MeterState {
    /// Bytes written by the render under way.
    file: u64,
    /// Bytes written by every render of this renderer.
    total: u64,
    /// When the render under way must end.
    deadline: Option<Instant>,
    /// The first limit the render under way crossed.
    hit: Option<Limit>,
}

impl Meter {
    fn new(limits: Limits) -> Self {
        Meter {
            limits,
            state: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, MeterState> {
        // The state stays consistent whatever panicked while holding it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A render begins: its own output count and deadline start now.
    fn start(&self) {
        let mut st = self.lock();
        st.file = 0;
        st.hit = None;
        st.deadline = Instant::now().checked_add(self.limits.render_timeout);
    }

    /// Bytes the render under way may still write, and the limit that stops it there.
    fn room(&self) -> (u64, Limit) {
        let st = self.lock();
        let file = self.limits.max_file_output.saturating_sub(st.file);
        let total = self.limits.max_total_output.saturating_sub(st.total);
        if file <= total {
            (file, Limit::FileOutput)
        } else {
            (total, Limit::TotalOutput)
        }
    }

    /// Account for `n` more bytes of output: `false` (and the limit recorded) when they would
    /// cross a limit or the render is past its deadline.
    fn admit(&self, n: usize) -> bool {
        let (room, limit) = self.room();
        let mut st = self.lock();
        if st.hit.is_some() {
            return false;
        }
        let crossed = if n as u64 > room {
            Some(limit)
        } else if st.deadline.is_some_and(|d| Instant::now() > d) {
            Some(Limit::Time)
        } else {
            None
        };
        if crossed.is_some() {
            st.hit = crossed;
            return false;
        }
        st.file += n as u64;
        st.total += n as u64;
        true
    }

    /// Fail when the render crossed a limit or is past its deadline; the error gets the
    /// template's place from minijinja.
    fn check(&self) -> Result<(), minijinja::Error> {
        let mut st = self.lock();
        if st.hit.is_none() && st.deadline.is_some_and(|d| Instant::now() > d) {
            st.hit = Some(Limit::Time);
        }
        match st.hit {
            None => Ok(()),
            Some(limit) => Err(self.error(limit)),
        }
    }

    fn error(&self, limit: Limit) -> minijinja::Error {
        minijinja::Error::new(
            minijinja::ErrorKind::InvalidOperation,
            limit.describe(&self.limits),
        )
    }

    fn hit(&self) -> Option<Limit> {
        self.lock().hit
    }

    /// Record a limit that minijinja itself enforced, or one found outside the render.
    fn record(&self, limit: Limit) {
        let mut st = self.lock();
        st.hit.get_or_insert(limit);
    }

    /// Bytes all renders of this renderer wrote.
    fn total(&self) -> u64 {
        self.lock().total
    }

    /// Count output written elsewhere (by a render child, or before a child started).
    fn add_total(&self, n: u64) {
        let mut st = self.lock();
        st.total = st.total.saturating_add(n);
    }
}

/// The output of one render: bytes the meter admits are kept, the rest dropped (the meter has
/// recorded the limit, and the next check fails the render), so memory stays bounded even while
/// minijinja unwinds.
struct MeteredWriter<'a> {
    out: Vec<u8>,
    meter: &'a Meter,
}

impl std::io::Write for MeteredWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.meter.admit(buf.len()) {
            self.out.extend_from_slice(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A `fmt::Write` that takes at most `room` bytes and then fails, which stops a `Display` of a
/// value early (nested lists that share items display exponentially large).
struct Capped {
    text: String,
    room: usize,
}

impl std::fmt::Write for Capped {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        if s.len() > self.room.saturating_sub(self.text.len()) {
            return Err(std::fmt::Error);
        }
        self.text.push_str(s);
        Ok(())
    }
}

/// Where a renderer's templates come from; sent to a render child as is.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) enum Origin {
    /// Files under these (canonical) roots, then kiln's built-ins.
    Roots(Vec<PathBuf>),
    /// These texts by name, then kiln's built-ins.
    Texts(BTreeMap<String, String>),
}

/// A template environment for one recipe load. When the kiln binary enabled render children
/// ([`super::sandbox`]), every render runs in a child process under an address-space, CPU-time
/// and wall-clock limit; otherwise in this process under fuel and the meter.
pub struct Renderer {
    env: Environment<'static>,
    origin: Origin,
    roots: TemplateRoots,
    loaded: Arc<Mutex<BTreeMap<String, LoadedTemplate>>>,
    meter: Arc<Meter>,
}

impl Renderer {
    pub fn new(roots: TemplateRoots, limits: &Limits) -> Self {
        Self::with_origin(Origin::Roots(roots.roots), limits)
    }

    /// A renderer that reads templates only from `texts` (name → text), then kiln's built-ins:
    /// what a stage uses to render with the templates a recipe was loaded with, on any worker.
    pub fn from_texts(texts: BTreeMap<String, String>, limits: &Limits) -> Self {
        Self::with_origin(Origin::Texts(texts), limits)
    }

    pub(crate) fn with_origin(origin: Origin, limits: &Limits) -> Self {
        let loaded: Arc<Mutex<BTreeMap<String, LoadedTemplate>>> = Arc::default();
        let meter = Arc::new(Meter::new(limits.clone()));
        let mut env = Environment::new();
        configure(&mut env, &meter);
        let roots = match &origin {
            Origin::Roots(r) => TemplateRoots { roots: r.clone() },
            Origin::Texts(_) => TemplateRoots { roots: Vec::new() },
        };
        let record = Arc::clone(&loaded);
        let loader_meter = Arc::clone(&meter);
        let loader_origin = origin.clone();
        let loader_roots = roots.clone();
        env.set_loader(move |name| {
            loader_meter.check()?;
            let found = match &loader_origin {
                Origin::Roots(_) => {
                    let path = loader_roots.find(name).map_err(|msg| {
                        minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg)
                    })?;
                    match path {
                        Some(path) => {
                            let max = loader_meter.limits.max_source_bytes;
                            let text = read_bounded(&path, max).map_err(|e| {
                                minijinja::Error::new(
                                    minijinja::ErrorKind::InvalidOperation,
                                    format!("reading template {}: {e}", path.display()),
                                )
                            })?;
                            Some((path, text))
                        }
                        None => builtin_template(name).map(|text| {
                            (PathBuf::from(format!("<builtin>/{name}")), text.to_string())
                        }),
                    }
                }
                Origin::Texts(texts) => texts
                    .get(name)
                    .cloned()
                    .or_else(|| builtin_template(name).map(str::to_string))
                    .map(|text| (PathBuf::from(name), text)),
            };
            let Some((path, text)) = found else {
                return Ok(None);
            };
            if let Ok(mut map) = record.lock() {
                map.insert(
                    name.to_string(),
                    LoadedTemplate {
                        path,
                        text: text.clone(),
                    },
                );
            }
            Ok(Some(text))
        });
        Renderer {
            env,
            origin,
            roots,
            loaded,
            meter,
        }
    }

    pub fn roots(&self) -> &TemplateRoots {
        &self.roots
    }

    /// Templates loaded so far (includes, and templates rendered by name), by name.
    pub fn loaded(&self) -> BTreeMap<String, LoadedTemplate> {
        self.loaded.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Render a recipe file's text with the context `ctx` (a JSON object). Errors point into
    /// the file (or into the included template the error is in).
    pub fn render_str(
        &self,
        file: &Path,
        text: &str,
        ctx: &serde_json::Value,
    ) -> Result<String, Diagnostic> {
        let job = Job::Str {
            file: file.to_path_buf(),
            text: text.to_string(),
        };
        self.render(job, ctx)
    }

    /// Render a template file by name (a file entry's `template:`). Errors point into the
    /// template (or the template it includes) when minijinja knows the place.
    pub fn render_template(
        &self,
        name: &str,
        ctx: &serde_json::Value,
    ) -> Result<String, Diagnostic> {
        self.render(
            Job::Template {
                name: name.to_string(),
            },
            ctx,
        )
    }

    fn render(&self, job: Job, ctx: &serde_json::Value) -> Result<String, Diagnostic> {
        let Some(exe) = super::sandbox::child_exe() else {
            return self.render_here(&job, ctx);
        };
        let request = super::sandbox::Request {
            limits: self.meter.limits.clone(),
            total_output: self.meter.total(),
            origin: self.origin.clone(),
            job: job.clone(),
            context: ctx.clone(),
        };
        let response = match super::sandbox::run(exe, &request) {
            Ok(response) => response,
            Err(super::sandbox::Failure::Spawn(why)) => {
                // Not the recipe's fault, and not a reason to fail its build: render here, under
                // fuel and the meter.
                tracing::warn!("rendering in-process: no render child: {why}");
                return self.render_here(&job, ctx);
            }
            Err(failure) => {
                let place = self.start_of(&job);
                return Err(failure.diagnostic(&self.meter.limits, place));
            }
        };
        if let Ok(mut map) = self.loaded.lock() {
            map.extend(response.loaded);
        }
        let out = response.result?;
        self.meter.add_total(out.len() as u64);
        Ok(out)
    }

    /// Render in this process (a render child does this, as does a process that did not enable
    /// render children).
    /// Count `n` bytes of output written before this renderer existed (a render child learns
    /// what its parent's earlier renders wrote).
    pub(crate) fn add_output(&self, n: u64) {
        self.meter.add_total(n);
    }

    pub(crate) fn render_here(
        &self,
        job: &Job,
        ctx: &serde_json::Value,
    ) -> Result<String, Diagnostic> {
        self.meter.start();
        let ctx = minijinja::Value::from(minijinja::value::Serde(ctx));
        let mut out = MeteredWriter {
            out: Vec::new(),
            meter: &self.meter,
        };
        let rendered = match job {
            Job::Str { file, text } => {
                let name = file.display().to_string();
                self.env
                    .template_from_named_str(&name, text)
                    .and_then(|t| t.render_captured_to(ctx, &mut out).map(drop))
            }
            Job::Template { name } => self
                .env
                .get_template(name)
                .and_then(|t| t.render_captured_to(ctx, &mut out).map(drop)),
        };
        let out = out.out;
        let (file, text) = match job {
            Job::Str { file, text } => (file.clone(), text.clone()),
            Job::Template { name } => match self.loaded().get(name) {
                Some(t) => (t.path.clone(), t.text.clone()),
                None => (PathBuf::from(name), String::new()),
            },
        };
        if let Err(e) = rendered {
            return Err(self.template_error(&e, &file, &text));
        }
        // A limit crossed after the last `{{ … }}` (the meter dropped the rest of the output).
        if let Some(limit) = self.meter.hit() {
            return Err(self.limit_error(limit, Some(first_line(&file, &text))));
        }
        String::from_utf8(out).map_err(|_| {
            Diagnostic::new(
                Kind::Template,
                format!("rendering {} produced invalid UTF-8", file.display()),
            )
            .help("templates produce text; remove binary data from the template")
        })
    }

    /// The first line of what `job` renders, for errors that have no better place.
    fn start_of(&self, job: &Job) -> Place {
        match job {
            Job::Str { file, text } => first_line(file, text),
            Job::Template { name } => match self.loaded().get(name) {
                Some(t) => first_line(&t.path, &t.text),
                None => {
                    let path = self.roots.find(name).ok().flatten();
                    let text = path
                        .as_deref()
                        .and_then(|p| read_bounded(p, self.meter.limits.max_source_bytes).ok())
                        .unwrap_or_default();
                    first_line(&path.unwrap_or_else(|| PathBuf::from(name)), &text)
                }
            },
        }
    }

    fn limit_error(&self, limit: Limit, place: Option<Place>) -> Diagnostic {
        Diagnostic::new(Kind::Limit, limit.describe(&self.meter.limits))
            .at(place)
            .help(limit.help())
    }

    /// The limit a failed render crossed: one the meter recorded, or fuel and recursion, which
    /// minijinja enforces itself.
    fn limit_of(&self, err: &minijinja::Error) -> Option<Limit> {
        let mut e: Option<&minijinja::Error> = Some(err);
        while let Some(cur) = e {
            if cur.kind() == minijinja::ErrorKind::OutOfFuel {
                self.meter.record(Limit::Fuel);
            } else if cur.detail() == Some("recursion limit exceeded") {
                self.meter.record(Limit::Recursion);
            }
            e = std::error::Error::source(cur).and_then(|s| s.downcast_ref());
        }
        self.meter.hit()
    }

    fn template_error(&self, err: &minijinja::Error, file: &Path, text: &str) -> Diagnostic {
        // Find the innermost error that has a location.
        let mut inner: Option<&minijinja::Error> = Some(err);
        let mut located = err;
        while let Some(e) = inner {
            if e.line().is_some() {
                located = e;
            }
            inner = std::error::Error::source(e).and_then(|s| s.downcast_ref());
        }
        let own_name = file.display().to_string();
        let (path, source) = match located.name() {
            Some(n) if n != own_name => match self.loaded().get(n) {
                Some(t) => (t.path.clone(), t.text.clone()),
                None => (file.to_path_buf(), text.to_string()),
            },
            _ => (file.to_path_buf(), text.to_string()),
        };
        let place = located.line().map(|line| {
            let line_text = source.lines().nth(line.saturating_sub(1)).unwrap_or("");
            let column = located
                .range()
                .and_then(|r| column_of(&source, r.start))
                .unwrap_or(1);
            Place {
                file: path,
                pos: Pos { line, column },
                line_text: line_text.to_string(),
                rendered: None,
            }
        });
        if let Some(limit) = self.limit_of(err) {
            let place = place.unwrap_or_else(|| first_line(file, text));
            return self.limit_error(limit, Some(place));
        }
        let help = match located.kind() {
            minijinja::ErrorKind::UndefinedError => {
                "templates see only `params` (declare it under `params:`), `env` (declare it \
                 under `env:`), `build` and `git`"
            }
            minijinja::ErrorKind::TemplateNotFound => {
                "templates are looked up in the recipe's directory and in templates/"
            }
            minijinja::ErrorKind::SyntaxError => "fix the template syntax ({{ expr }}, {% tag %})",
            _ => "fix the template",
        };
        Diagnostic::new(Kind::Template, describe(err))
            .at(place)
            .help(help)
    }
}

/// What one render renders: a recipe file's text, or a template by name.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) enum Job {
    Str { file: PathBuf, text: String },
    Template { name: String },
}

/// Line 1, column 1 of a file.
fn first_line(file: &Path, text: &str) -> Place {
    Place {
        file: file.to_path_buf(),
        pos: Pos { line: 1, column: 1 },
        line_text: text.lines().next().unwrap_or("").to_string(),
        rendered: None,
    }
}

/// Strict undefined values, no auto-escaping (recipes are YAML: values are inserted as written; use
/// `| tojson` to quote), block tags that leave no blank lines, and the limits: fuel, recursion,
/// and the meter checked around every `{{ … }}`.
fn configure(env: &mut Environment<'static>, meter: &Arc<Meter>) {
    env.set_fuel(Some(meter.limits.fuel));
    env.set_recursion_limit(meter.limits.recursion_limit);
    let formatter_meter = Arc::clone(meter);
    env.set_formatter(move |out, state, value| {
        formatter_meter.check()?;
        if value.as_str().is_none() && matches!(state.auto_escape(), AutoEscape::None) {
            // Lists and maps display item by item; stop as soon as the text cannot fit.
            let (room, limit) = formatter_meter.room();
            let mut text = Capped {
                text: String::new(),
                room: usize::try_from(room).unwrap_or(usize::MAX),
            };
            if write!(text, "{value}").is_err() {
                formatter_meter.record(limit);
                return Err(formatter_meter.error(limit));
            }
            out.write_str(&text.text)?;
        } else {
            minijinja::escape_formatter(out, state, value)?;
        }
        formatter_meter.check()
    });
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
    if let Ok(syntax) = minijinja::syntax::SyntaxConfig::builder()
        .keep_trailing_newline(true)
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
    {
        env.set_syntax(syntax);
    }
}

/// The error's own message plus its causes, without minijinja's debug dump.
fn describe(err: &minijinja::Error) -> String {
    let mut msg = match err.detail() {
        Some(d) => format!("{}: {d}", err.kind()),
        None => err.kind().to_string(),
    };
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        if let Some(e) = s.downcast_ref::<minijinja::Error>() {
            msg = match e.detail() {
                Some(d) => format!("{}: {d}", e.kind()),
                None => e.kind().to_string(),
            };
        }
        source = s.source();
    }
    msg
}

/// 1-based column of a byte offset.
fn column_of(text: &str, offset: usize) -> Option<usize> {
    let before = text.get(..offset)?;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    Some(before[line_start..].chars().count() + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roots_refuse_escapes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ok.j2"), "x").unwrap();
        let roots = TemplateRoots::new([dir.path().to_path_buf()]);
        assert!(roots.find("ok.j2").unwrap().is_some());
        assert!(roots.find("missing.j2").unwrap().is_none());
        assert!(roots.find("../etc/passwd").is_err());
        assert!(roots.find("/etc/passwd").is_err());
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("evil.j2")).unwrap();
        assert!(roots.find("evil.j2").is_err());
    }

    #[test]
    fn undefined_variables_are_errors_with_places() {
        let r = Renderer::new(TemplateRoots::new([]), &Limits::default());
        let ctx = serde_json::json!({"params": {"a": 1}});
        let err = r
            .render_str(Path::new("r.yaml"), "x: 1\ny: {{ params.b }}\n", &ctx)
            .unwrap_err();
        assert_eq!(err.kind, Kind::Template);
        let place = err.place.unwrap();
        assert_eq!(place.pos.line, 2);
        assert!(place.pos.column >= 4, "{:?}", place.pos);
    }

    /// Render `text` as `r.yaml` in-process under `limits`.
    fn render_with(limits: &Limits, text: &str) -> Result<String, Diagnostic> {
        let r = Renderer::new(TemplateRoots::new([]), limits);
        r.render_str(Path::new("r.yaml"), text, &serde_json::json!({}))
    }

    /// The limit error of a render that must fail: its message and `line:column`.
    fn limit_hit(limits: &Limits, text: &str) -> (String, (usize, usize)) {
        let err = render_with(limits, text).expect_err("the render must cross a limit");
        assert_eq!(err.kind, Kind::Limit, "{err}");
        let place = err.place.as_ref().expect("a limit error has a place");
        assert_eq!(place.file, Path::new("r.yaml"));
        (err.message.clone(), (place.pos.line, place.pos.column))
    }

    #[test]
    fn limits_stop_renders_with_the_limit_and_a_place() {
        let small = Limits {
            fuel: 100_000,
            max_file_output: 1000,
            max_total_output: 1500,
            ..Limits::default()
        };
        /// What, template, message, line and column (none where fuel runs out, which depends
        /// on minijinja's costs).
        type Case<'a> = (&'a str, &'a str, &'a str, (usize, Option<usize>));
        let cases: &[Case] = &[
            (
                "one huge string",
                "a: 1\nb: {{ 'x' * 1000000000 }}\n",
                "limit of 100000 fuel",
                (2, None),
            ),
            (
                "loops in loops",
                "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                "limit of 100000 fuel",
                (1, None),
            ),
            (
                "output of one file",
                "a: 1\n{% for i in range(100) %}{{ 'x' * 20 }}\n{% endfor %}",
                "limit of 1000 bytes per rendered file",
                (2, Some(29)),
            ),
            (
                "raw text after the last expression",
                "{% for i in range(100) %}xxxxxxxxxxxxxxxxxxxx\n{% endfor %}",
                "limit of 1000 bytes per rendered file",
                (1, Some(1)),
            ),
            (
                "a list nested in itself, displayed",
                "{% set a = [1, 1] %}{% for _ in range(1) %}{% endfor %}\
                 {% set a = [a, a] %}{% set a = [a, a] %}{% set a = [a, a] %}{% set a = [a, a] %}\
                 {% set a = [a, a] %}{% set a = [a, a] %}{% set a = [a, a] %}{% set a = [a, a] %}\
                 {{ a }}",
                "limit of 1000 bytes per rendered file",
                (1, Some(219)),
            ),
            (
                "a macro calling itself",
                "{% macro f() %}{{ f() }}{% endmacro %}\nx: {{ f() }}",
                "limit of 500 levels",
                (1, Some(19)),
            ),
        ];
        let mut wrong = Vec::new();
        for (name, text, message, place) in cases {
            let (got, at) = limit_hit(&small, text);
            if !got.contains(message) || at.0 != place.0 || place.1.is_some_and(|c| c != at.1) {
                wrong.push(format!("{name}: {at:?} {got}"));
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    #[test]
    fn total_output_counts_every_render() {
        let limits = Limits {
            max_file_output: 1000,
            max_total_output: 1500,
            ..Limits::default()
        };
        let r = Renderer::new(TemplateRoots::new([]), &limits);
        let text = "{{ 'x' * 800 }}";
        let ctx = serde_json::json!({});
        assert_eq!(r.render_str(Path::new("a"), text, &ctx).unwrap().len(), 800);
        let err = r.render_str(Path::new("b"), text, &ctx).unwrap_err();
        assert_eq!(err.kind, Kind::Limit);
        assert!(
            err.message.contains("limit of 1500 bytes in total"),
            "{err}"
        );
    }

    #[test]
    fn a_render_past_its_deadline_fails_at_its_next_write() {
        let limits = Limits {
            render_timeout: std::time::Duration::ZERO,
            ..Limits::default()
        };
        let (message, at) = limit_hit(&limits, "a: 1\nb: {{ 2 }}\n");
        assert!(
            message.contains("longer than the limit of 0 s"),
            "{message}"
        );
        assert_eq!(at, (2, 7));
    }

    #[test]
    fn renders_within_limits_are_unchanged() {
        let out = render_with(&Limits::default(), "a: {{ [1, 2] }}\nb: {{ 'x' ~ 1 }}\n").unwrap();
        assert_eq!(out, "a: [1, 2]\nb: x1\n");
    }
}
