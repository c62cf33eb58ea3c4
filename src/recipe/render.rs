//! Template rendering: a minijinja environment whose only view of the world is the recipe's
//! context and template files under its roots (the recipe's own directory and the project's
//! `templates/`). Undefined variables are errors; every template loaded is recorded so that it
//! counts towards the build's inputs.

use super::diag::{Diagnostic, Kind, Place, Pos};
use minijinja::{Environment, UndefinedBehavior};
use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

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
#[derive(Debug, Clone, PartialEq, Eq)]
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

/// A template environment for one recipe render.
pub struct Renderer {
    env: Environment<'static>,
    roots: TemplateRoots,
    loaded: Arc<Mutex<BTreeMap<String, LoadedTemplate>>>,
}

impl Renderer {
    pub fn new(roots: TemplateRoots) -> Self {
        let loaded: Arc<Mutex<BTreeMap<String, LoadedTemplate>>> = Arc::default();
        let mut env = Environment::new();
        configure(&mut env);
        let loader_roots = roots.clone();
        let record = Arc::clone(&loaded);
        env.set_loader(move |name| {
            let path = loader_roots.find(name).map_err(|msg| {
                minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg)
            })?;
            let Some(path) = path else {
                let Some(text) = builtin_template(name) else {
                    return Ok(None);
                };
                if let Ok(mut map) = record.lock() {
                    map.insert(
                        name.to_string(),
                        LoadedTemplate {
                            path: PathBuf::from(format!("<builtin>/{name}")),
                            text: text.to_string(),
                        },
                    );
                }
                return Ok(Some(text.to_string()));
            };
            let text = std::fs::read_to_string(&path).map_err(|e| {
                minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    format!("reading template {}: {e}", path.display()),
                )
            })?;
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
        Renderer { env, roots, loaded }
    }

    pub fn roots(&self) -> &TemplateRoots {
        &self.roots
    }

    /// A renderer that reads templates only from `texts` (name → text), then kiln's built-ins:
    /// what a stage uses to render with the templates a recipe was loaded with, on any worker.
    pub fn from_texts(texts: BTreeMap<String, String>) -> Self {
        let loaded: Arc<Mutex<BTreeMap<String, LoadedTemplate>>> = Arc::default();
        let mut env = Environment::new();
        configure(&mut env);
        env.set_loader(move |name| {
            Ok(texts
                .get(name)
                .cloned()
                .or_else(|| builtin_template(name).map(str::to_string)))
        });
        Renderer {
            env,
            roots: TemplateRoots { roots: Vec::new() },
            loaded,
        }
    }

    /// Templates loaded so far (includes, and templates rendered by name), by name.
    pub fn loaded(&self) -> BTreeMap<String, LoadedTemplate> {
        self.loaded.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Render a recipe file's text. Errors point into the file (or into the included template
    /// the error is in).
    pub fn render_str(
        &self,
        file: &Path,
        text: &str,
        ctx: &minijinja::Value,
    ) -> Result<String, Diagnostic> {
        let name = file.display().to_string();
        self.env
            .render_named_str(&name, text, ctx)
            .map_err(|e| self.template_error(&e, file, text))
    }

    /// Render a template file by name (a file entry's `template:`).
    pub fn render_template(&self, name: &str, ctx: &minijinja::Value) -> Result<String, String> {
        let tmpl = self.env.get_template(name).map_err(|e| describe(&e))?;
        tmpl.render(ctx).map_err(|e| describe(&e))
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

/// Strict undefined values, no auto-escaping (recipes are YAML: values are inserted as written; use
/// `| tojson` to quote), and block tags that leave no blank lines.
fn configure(env: &mut Environment<'static>) {
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
        let r = Renderer::new(TemplateRoots::new([]));
        let ctx = minijinja::Value::from(minijinja::value::Serde(
            serde_json::json!({"params": {"a": 1}}),
        ));
        let err = r
            .render_str(Path::new("r.yaml"), "x: 1\ny: {{ params.b }}\n", &ctx)
            .unwrap_err();
        assert_eq!(err.kind, Kind::Template);
        let place = err.place.unwrap();
        assert_eq!(place.pos.line, 2);
        assert!(place.pos.column >= 4, "{:?}", place.pos);
    }
}
