//! Loading a recipe: read the file and its `extends:` chain, take the plain preamble (`params`,
//! `env`, `source_date_epoch`, `extends`), render every file with minijinja, deserialize each into
//! the typed schema (errors located in the file that has them), merge base → child, validate, and
//! render the templates that file entries name. The build's `inputs` digest covers every file read
//! and every parameter, so the same inputs give the same value.

use super::diag::{Diagnostic, Kind, Place, Pos, did_you_mean};
use super::limits::{Limits, ReadError, read_bounded};
use super::locate::{LineMap, PathIndex};
use super::render::{Renderer, TemplateRoots};
use super::schema::Recipe;
use super::validate::validate;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What the caller controls besides the recipe file.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// `--set KEY=VALUE` overrides, in order.
    pub set: Vec<(String, String)>,
    /// The project's `templates/` directory; default: the nearest `templates/` above the recipe.
    pub templates_dir: Option<PathBuf>,
    /// The recipe's git commit and ref, when it comes from git.
    pub git: GitInfo,
    /// Environment lookup (the process environment by default; tests pass their own).
    pub env: Option<BTreeMap<String, String>>,
    /// Bounds on rendering and on the files read (an operator setting, never from a recipe).
    pub limits: Limits,
}

/// Where the recipe came from in git (empty when it did not).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GitInfo {
    pub commit: String,
    #[serde(rename = "ref")]
    pub reference: String,
    /// Commit time, used as SOURCE_DATE_EPOCH when the recipe sets none.
    #[serde(skip)]
    pub time: Option<i64>,
}

/// A loaded, rendered and validated recipe: everything later stages need, self-contained (it
/// carries the text of every template it used), so it can be stored and sent to another worker.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Loaded {
    pub recipe: Recipe,
    /// `sha256:<hex>` over the recipe chain, templates, parameters and environment used.
    pub inputs: String,
    pub source_date_epoch: i64,
    /// Effective parameters (defaults merged with `--set`).
    pub params: BTreeMap<String, Value>,
    /// Rendered text of every `rootfs.files[].template`, by image path.
    pub rendered_files: BTreeMap<String, String>,
    /// Every file read: the recipe chain (child first) and the templates.
    pub sources: Vec<PathBuf>,
    /// The template context (`params`, `env`, `build`, `git`) the recipe was rendered with.
    pub context: Value,
    /// The text of every template the recipe and the build use, by name.
    pub templates: BTreeMap<String, String>,
    /// The text of `kernel.build.fragment` (read from the project at load time, so a worker
    /// elsewhere builds the same kernel); it counts towards `build.inputs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_fragment: Option<String>,
}

impl Loaded {
    /// The recipe's templates and render context, for the files kiln renders itself.
    pub fn template_set(&self) -> TemplateSet<'_> {
        TemplateSet {
            context: &self.context,
            texts: &self.templates,
        }
    }
}

/// Templates (the recipe's, else kiln's built-ins) and the context a recipe was rendered with.
#[derive(Debug, Clone, Copy)]
pub struct TemplateSet<'a> {
    context: &'a Value,
    texts: &'a BTreeMap<String, String>,
}

impl TemplateSet<'_> {
    /// Render a template with the recipe's context plus `extra` (an object whose keys are added
    /// at the top level), under the default [`Limits`]. The error is one line:
    /// `file:line:column: message` when the place is known.
    pub fn render(&self, name: &str, extra: Value) -> Result<String, String> {
        let mut ctx = self.context.clone();
        if let (Value::Object(c), Value::Object(e)) = (&mut ctx, extra) {
            c.extend(e);
        }
        let renderer = Renderer::from_texts(self.texts.clone(), &Limits::default());
        renderer
            .render_template(name, &ctx)
            .map_err(|d| match d.location() {
                Some(at) => format!("{at}: {}", d.message),
                None => d.message,
            })
    }
}

/// Templates the build itself renders for a rootfs base; they count towards `build.inputs`.
pub fn standard_templates(recipe: &Recipe) -> &'static [&'static str] {
    match recipe.rootfs.base {
        super::schema::RootfsBase::Busybox => &[
            "busybox/init.sh.j2",
            "busybox/passwd.j2",
            "busybox/group.j2",
            "busybox/fstab.j2",
            "busybox/applets.txt",
        ],
        super::schema::RootfsBase::Debian => &[
            "debian/hosts.j2",
            "debian/fstab.j2",
            "debian/dhcp.network.j2",
            "debian/ssh-host-keys.service.j2",
            "debian/kiln-verify.service.j2",
            "debian/kiln-verify.sh.j2",
        ],
    }
}

/// One file of the `extends:` chain.
struct Doc {
    path: PathBuf,
    text: String,
    preamble: Preamble,
}

/// The plain (untemplated) top-level keys.
#[derive(Debug, Default, serde::Deserialize)]
struct Preamble {
    #[serde(default)]
    extends: Option<String>,
    #[serde(default)]
    params: BTreeMap<String, Value>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    source_date_epoch: Option<i64>,
}

const PREAMBLE_KEYS: [&str; 4] = ["extends", "params", "env", "source_date_epoch"];

/// Load `path` with `opts`. Every error is a [`Diagnostic`] with a place when there is one.
pub fn load(path: &Path, opts: &LoadOptions) -> Result<Loaded, Diagnostic> {
    let chain = read_chain(path, &opts.limits)?;
    let top_dir = parent_dir(path);
    let templates_dir = opts
        .templates_dir
        .clone()
        .or_else(|| find_templates_dir(&top_dir));
    let mut root_candidates = vec![top_dir.clone()];
    root_candidates.extend(templates_dir.clone());
    let roots = TemplateRoots::new(root_candidates);

    // Parameters: base defaults, child defaults, then --set.
    let mut params: BTreeMap<String, Value> = BTreeMap::new();
    let mut env_decl: BTreeMap<String, String> = BTreeMap::new();
    let mut epoch = None;
    for doc in chain.iter().rev() {
        params.extend(doc.preamble.params.clone());
        env_decl.extend(doc.preamble.env.clone());
        if doc.preamble.source_date_epoch.is_some() {
            epoch = doc.preamble.source_date_epoch;
        }
    }
    for (key, value) in &opts.set {
        let Some(default) = params.get(key) else {
            let known: Vec<&str> = params.keys().map(String::as_str).collect();
            let mut d = Diagnostic::new(
                Kind::Param,
                format!("--set {key}: the recipe declares no parameter `{key}`"),
            );
            d = match did_you_mean(key, known.iter().copied()) {
                Some(s) => d.help(format!("did you mean `{s}`?")),
                None if known.is_empty() => {
                    d.help("declare it under `params:` in the recipe with a default value")
                }
                None => d.help(format!("parameters of this recipe: {}", known.join(", "))),
            };
            return Err(d);
        };
        let typed = coerce_param(key, value, default)?;
        params.insert(key.clone(), typed);
    }
    let env_values: BTreeMap<String, String> = env_decl
        .iter()
        .map(|(name, default)| {
            let from_env = match &opts.env {
                Some(map) => map.get(name).cloned(),
                // The caller's own environment (kiln render/check/build on a laptop), but
                // never kiln's credentials.
                None if crate::pipeline::access::is_forbidden_env(name) => None,
                None => std::env::var(name).ok(),
            };
            (name.clone(), from_env.unwrap_or_else(|| default.clone()))
        })
        .collect();
    let source_date_epoch = epoch.or(opts.git.time).unwrap_or(0);

    // Pass 1: render with an empty digest to learn which templates the recipe reads.
    let renderer = Renderer::new(roots.clone(), &opts.limits);
    let ctx = context_json(&params, &env_values, "", source_date_epoch, &opts.git);
    let mut file_templates = Vec::new();
    let mut pass1 = Value::Object(Map::new());
    for doc in chain.iter().rev() {
        let rendered = renderer.render_str(&doc.path, &doc.text, &ctx)?;
        let recipe = deserialize_doc(doc, &rendered)?;
        for f in &recipe.rootfs.files {
            if let Some(t) = &f.template {
                file_templates.push(t.clone());
            }
        }
        if let Ok(v) = serde_saphyr::from_str::<Value>(&rendered) {
            merge(&mut pass1, v);
        }
    }
    let mut fragment_name = None;
    if let Ok(recipe) = serde_json::from_value::<Recipe>(pass1) {
        file_templates.extend(standard_templates(&recipe).iter().map(|s| s.to_string()));
        fragment_name = recipe.kernel.build.map(|b| b.fragment);
    }
    for t in &file_templates {
        // Errors are reported in pass 2 with their places in the recipe; a crossed limit is
        // reported now (with its place in the template), so a bomb does not run twice.
        if let Err(d) = renderer.render_template(t, &ctx)
            && d.kind == Kind::Limit
        {
            return Err(d);
        }
    }
    let templates = renderer.loaded();
    let mut template_texts: BTreeMap<String, String> = templates
        .iter()
        .map(|(name, t)| (name.clone(), t.text.clone()))
        .collect();
    // The kernel fragment is an input like a template (errors are reported after validation).
    let project = project_dir(&top_dir);
    let mut hashed = templates.clone();
    if let Some(name) = &fragment_name
        && let Ok((path, text)) = read_fragment(&project, name, &opts.limits)
    {
        hashed.insert(
            format!("kernel-fragment:{name}"),
            super::render::LoadedTemplate { path, text },
        );
    }
    let inputs = inputs_digest(
        &chain,
        &top_dir,
        &hashed,
        &params,
        &env_values,
        source_date_epoch,
        &opts.git,
    );

    // Pass 2: the real render.
    let renderer = Renderer::new(roots, &opts.limits);
    let ctx = context_json(&params, &env_values, &inputs, source_date_epoch, &opts.git);
    let mut merged = Value::Object(Map::new());
    let mut indexes = Vec::new();
    for doc in chain.iter().rev() {
        let rendered = renderer.render_str(&doc.path, &doc.text, &ctx)?;
        deserialize_doc(doc, &rendered)?;
        let value: Value =
            serde_saphyr::from_str(&rendered).map_err(|e| yaml_error(doc, &rendered, &e))?;
        merge(&mut merged, value);
        indexes.push((
            doc,
            PathIndex::new(&rendered),
            LineMap::new(&doc.text, &rendered),
            rendered,
        ));
    }
    if let Value::Object(map) = &mut merged {
        map.remove("extends");
        map.remove("$schema");
    }
    let mut recipe: Recipe = serde_json::from_value(merged).map_err(|e| {
        Diagnostic::new(Kind::Schema, format!("merging the extends chain: {e}"))
            .at(Some(top_place(&chain[0])))
            .help("a recipe that extends another may only set fields of the same types")
    })?;

    // Semantic checks, located in the child-most file that writes the path.
    let locate = |path: &str| -> Option<Place> {
        let exact = indexes
            .iter()
            .rev()
            .find(|(_, idx, _, _)| idx.contains(path));
        let (doc, idx, map, rendered) = exact.or_else(|| indexes.last())?;
        let pos = idx.find(path)?;
        Some(place_in(doc, rendered, map, pos))
    };
    recipe.params = params.clone();
    let problems = validate(&recipe);
    if let Some(p) = problems.first() {
        return Err(Diagnostic::new(Kind::Semantic, p.message.clone())
            .at(locate(&p.path))
            .help(p.help.clone()));
    }

    let kernel_fragment = match &recipe.kernel.build {
        None => None,
        Some(b) => Some(
            read_fragment(&project, &b.fragment, &opts.limits)
                .map_err(|d| d.at(locate("kernel.build.fragment")))?
                .1,
        ),
    };

    let mut rendered_files = BTreeMap::new();
    for (i, f) in recipe.rootfs.files.iter().enumerate() {
        let Some(name) = &f.template else { continue };
        let at = format!("rootfs.files[{i}].template");
        let text = match roots_lookup(&renderer, name) {
            Ok(true) => renderer.render_template(name, &ctx).map_err(|d| {
                if d.kind == Kind::Limit {
                    return d;
                }
                Diagnostic::new(Kind::Template, format!("template `{name}`: {}", d.message))
                    .at(locate(&at))
                    .help("fix the template; it is rendered with the recipe's context")
            })?,
            Ok(false) => {
                let where_ = renderer
                    .roots()
                    .roots()
                    .iter()
                    .map(|r| r.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(Diagnostic::new(
                    Kind::Template,
                    format!("template `{name}` not found"),
                )
                .at(locate(&at))
                .help(format!("templates are looked up in: {where_}")));
            }
            Err(msg) => {
                return Err(Diagnostic::new(Kind::Template, msg)
                    .at(locate(&at))
                    .help("name templates relative to the recipe's directory or templates/"));
            }
        };
        rendered_files.insert(f.path.clone(), text);
    }

    let mut sources: Vec<PathBuf> = chain.iter().map(|d| d.path.clone()).collect();
    sources.extend(renderer.loaded().values().map(|t| t.path.clone()));
    let context = context_json(&params, &env_values, &inputs, source_date_epoch, &opts.git);
    Ok(Loaded {
        recipe,
        inputs,
        source_date_epoch,
        params,
        rendered_files,
        sources,
        context,
        templates: {
            template_texts.extend(renderer.loaded().into_iter().map(|(n, t)| (n, t.text)));
            template_texts
        },
        kernel_fragment,
    })
}

/// The project a recipe belongs to: the parent of the nearest `templates/`, else the recipe's
/// directory.
fn project_dir(top_dir: &Path) -> PathBuf {
    find_templates_dir(top_dir)
        .and_then(|t| t.parent().map(Path::to_path_buf))
        .or_else(|| top_dir.canonicalize().ok())
        .unwrap_or_else(|| top_dir.to_path_buf())
}

/// Read a kernel configuration fragment named relative to the project root; it must stay inside
/// the project and exist.
fn read_fragment(
    project: &Path,
    name: &str,
    limits: &Limits,
) -> Result<(PathBuf, String), Diagnostic> {
    let rel = Path::new(name);
    if rel.is_absolute()
        || rel.components().any(|c| {
            !matches!(
                c,
                std::path::Component::Normal(_) | std::path::Component::CurDir
            )
        })
    {
        return Err(Diagnostic::new(
            Kind::Semantic,
            format!("kernel.build.fragment `{name}` leaves the project"),
        )
        .help("name the fragment relative to the project root, e.g. kernel-configs/virt-minimal.config"));
    }
    let path = project.join(rel);
    let real = path.canonicalize().map_err(|e| {
        Diagnostic::new(
            Kind::Io,
            format!(
                "cannot read kernel.build.fragment `{name}` ({}): {e}",
                path.display()
            ),
        )
        .help(format!(
            "fragments are looked up relative to the project root {}",
            project.display()
        ))
    })?;
    if !real.starts_with(project) {
        return Err(Diagnostic::new(
            Kind::Semantic,
            format!(
                "kernel.build.fragment `{name}` points outside the project {}",
                project.display()
            ),
        )
        .help("keep fragments inside the project (kernel-configs/)"));
    }
    let text = read_bounded(&real, limits.max_source_bytes).map_err(|e| {
        Diagnostic::new(
            Kind::Io,
            format!(
                "cannot read kernel.build.fragment `{name}` ({}): {e}",
                real.display()
            ),
        )
        .help("a fragment is a small text file of CONFIG_… lines inside the project")
    })?;
    Ok((real, text))
}

fn roots_lookup(renderer: &Renderer, name: &str) -> Result<bool, String> {
    renderer.roots().find(name).map(|p| p.is_some())
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The nearest `templates/` directory at or above `dir`.
pub fn find_templates_dir(dir: &Path) -> Option<PathBuf> {
    let start = dir.canonicalize().ok()?;
    start
        .ancestors()
        .map(|a| a.join("templates"))
        .find(|t| t.is_dir())
}

/// Read the recipe and its `extends:` chain, child first. A base must stay inside the directory
/// tree of the project (the parent of the nearest `templates/`, else the recipe's directory).
fn read_chain(path: &Path, limits: &Limits) -> Result<Vec<Doc>, Diagnostic> {
    let mut chain: Vec<Doc> = Vec::new();
    let mut next = Some(path.to_path_buf());
    let top_dir = parent_dir(path);
    let project = find_templates_dir(&top_dir)
        .and_then(|t| t.parent().map(Path::to_path_buf))
        .or_else(|| top_dir.canonicalize().ok())
        .unwrap_or_else(|| top_dir.clone());
    while let Some(p) = next.take() {
        let text = read_bounded(&p, limits.max_source_bytes).map_err(|e| {
            let d = Diagnostic::new(Kind::Io, format!("cannot read recipe {}: {e}", p.display()));
            match e {
                ReadError::TooLarge { .. } => d
                    .help("split the recipe (`extends:`, templates) or ask the operator to raise the limit"),
                ReadError::Io(_) => d.help(
                    "check the path; recipes are YAML files such as recipes/minimal.yaml",
                ),
            }
        })?;
        let doc_stub = Doc {
            path: p.clone(),
            text: text.clone(),
            preamble: Preamble::default(),
        };
        let preamble = parse_preamble(&doc_stub)?;
        if let Some(base) = &preamble.extends {
            let base_path = parent_dir(&p).join(base);
            let place = locate_raw(&doc_stub, "extends");
            let real = base_path.canonicalize().map_err(|e| {
                Diagnostic::new(
                    Kind::Io,
                    format!(
                        "cannot read base recipe `{base}` ({}): {e}",
                        base_path.display()
                    ),
                )
                .at(place.clone())
                .help("`extends:` takes a path relative to this recipe's directory")
            })?;
            if !real.starts_with(&project) {
                return Err(Diagnostic::new(
                    Kind::Semantic,
                    format!(
                        "base recipe `{base}` is outside the project {}",
                        project.display()
                    ),
                )
                .at(place)
                .help("extend recipes inside the project only"));
            }
            if chain
                .iter()
                .any(|d| d.path.canonicalize().ok().as_ref() == Some(&real))
                || path.canonicalize().ok().as_ref() == Some(&real)
            {
                return Err(Diagnostic::new(
                    Kind::Semantic,
                    format!("`extends: {base}` makes a cycle"),
                )
                .at(place)
                .help("a recipe cannot extend itself or one of the recipes extending it"));
            }
            next = Some(base_path);
        }
        chain.push(Doc {
            path: p,
            text,
            preamble,
        });
        if chain.len() > 16 {
            return Err(
                Diagnostic::new(Kind::Semantic, "`extends:` chain longer than 16")
                    .help("flatten the recipe hierarchy"),
            );
        }
    }
    Ok(chain)
}

/// Take the top-level preamble blocks out of the raw text and parse them as plain YAML.
fn parse_preamble(doc: &Doc) -> Result<Preamble, Diagnostic> {
    let mut out = String::new();
    let mut first_line: BTreeMap<usize, usize> = BTreeMap::new();
    let mut inside = false;
    for (n, line) in doc.text.lines().enumerate() {
        let starts_block = line
            .chars()
            .next()
            .is_some_and(|c| !c.is_whitespace() && c != '-' && c != '#');
        if starts_block {
            inside = PREAMBLE_KEYS.iter().any(|k| {
                line.strip_prefix(k)
                    .is_some_and(|r| r.trim_start().starts_with(':'))
            });
        }
        if inside {
            first_line.insert(out.lines().count(), n);
            out.push_str(line);
            out.push('\n');
        }
    }
    if out.contains("{{") || out.contains("{%") {
        let line = doc
            .text
            .lines()
            .position(|l| l.contains("{{") || l.contains("{%"))
            .unwrap_or(0);
        return Err(Diagnostic::new(
            Kind::Semantic,
            "`params`, `env`, `extends` and `source_date_epoch` must be plain YAML",
        )
        .at(Some(Place {
            file: doc.path.clone(),
            pos: Pos {
                line: line + 1,
                column: 1,
            },
            line_text: doc.text.lines().nth(line).unwrap_or("").to_string(),
            rendered: None,
        }))
        .help("templates need these values before rendering; write literal values"));
    }
    serde_saphyr::from_str::<Preamble>(&out).map_err(|e| {
        let (line, col) = e
            .location()
            .map(|l| (l.line() as usize, l.column() as usize))
            .unwrap_or((1, 1));
        let src_line = first_line
            .get(&line.saturating_sub(1))
            .copied()
            .unwrap_or(0);
        Diagnostic::new(Kind::Yaml, clean_yaml_message(&e))
            .at(Some(Place {
                file: doc.path.clone(),
                pos: Pos {
                    line: src_line + 1,
                    column: col.max(1),
                },
                line_text: doc.text.lines().nth(src_line).unwrap_or("").to_string(),
                rendered: None,
            }))
            .help("`params` maps names to default values, `env` maps variable names to defaults")
    })
}

/// The raw place of a top-level key (before rendering).
fn locate_raw(doc: &Doc, key: &str) -> Option<Place> {
    let (n, line) = doc
        .text
        .lines()
        .enumerate()
        .find(|(_, l)| l.starts_with(key))?;
    Some(Place {
        file: doc.path.clone(),
        pos: Pos {
            line: n + 1,
            column: 1,
        },
        line_text: line.to_string(),
        rendered: None,
    })
}

fn top_place(doc: &Doc) -> Place {
    Place {
        file: doc.path.clone(),
        pos: Pos { line: 1, column: 1 },
        line_text: doc.text.lines().next().unwrap_or("").to_string(),
        rendered: None,
    }
}

/// Turn a position in the rendered text into a place in the source file.
fn place_in(doc: &Doc, rendered: &str, map: &LineMap, pos: Pos) -> Place {
    let (line, same) = map.source_line(pos.line);
    let line_text = doc.text.lines().nth(line - 1).unwrap_or("").to_string();
    if same {
        Place {
            file: doc.path.clone(),
            pos: Pos {
                line,
                column: pos.column,
            },
            line_text,
            rendered: None,
        }
    } else {
        let rendered_line = rendered.lines().nth(pos.line - 1).unwrap_or("").to_string();
        let column = line_text.len() - line_text.trim_start().len() + 1;
        Place {
            file: doc.path.clone(),
            pos: Pos { line, column },
            line_text,
            rendered: Some(rendered_line),
        }
    }
}

/// Deserialize one rendered file into the typed schema, to report schema errors where they are.
fn deserialize_doc(doc: &Doc, rendered: &str) -> Result<Recipe, Diagnostic> {
    serde_saphyr::from_str::<Recipe>(rendered).map_err(|e| yaml_error(doc, rendered, &e))
}

fn yaml_error(doc: &Doc, rendered: &str, e: &serde_saphyr::Error) -> Diagnostic {
    let map = LineMap::new(&doc.text, rendered);
    let place = e.location().map(|l| {
        place_in(
            doc,
            rendered,
            &map,
            Pos {
                line: (l.line() as usize).max(1),
                column: (l.column() as usize).max(1),
            },
        )
    });
    let message = clean_yaml_message(e);
    let (kind, help) = if let Some((got, expected)) = unknown_field(&message) {
        let help = match did_you_mean(&got, expected.iter().map(String::as_str)) {
            Some(s) => format!("did you mean `{s}`?"),
            None => format!("expected one of: {}", expected.join(", ")),
        };
        (Kind::Schema, help)
    } else if message.contains("invalid type") || message.contains("unknown variant") {
        (
            Kind::Schema,
            "see docs/recipes.md for each field's type and values".to_string(),
        )
    } else {
        (
            Kind::Yaml,
            "fix the YAML syntax (indentation, `key: value`, quotes around values with `:` or `#`)"
                .to_string(),
        )
    };
    Diagnostic::new(kind, message).at(place).help(help)
}

/// The error message without the position and snippet the YAML library appends.
fn clean_yaml_message(e: &serde_saphyr::Error) -> String {
    let full = e.to_string();
    let first = full.lines().next().unwrap_or(&full).trim();
    let first = first.trim_start_matches("error: ");
    let first = match first.find(" at line ") {
        Some(i) => &first[..i],
        None => first,
    };
    // Drop a leading "line N column M: " (the place is reported separately).
    let first = match first.strip_prefix("line ").and_then(|r| r.split_once(": ")) {
        Some((pos, rest)) if pos.contains("column") => rest,
        _ => first,
    };
    first.to_string()
}

/// `unknown field `x`, expected one of a, b` (names with or without backticks) → (x, [a, b]).
fn unknown_field(message: &str) -> Option<(String, Vec<String>)> {
    let rest = message.split("unknown field `").nth(1)?;
    let (got, rest) = rest.split_once('`')?;
    let expected = match rest.split_once("expected one of ") {
        Some((_, list)) => list
            .split(", ")
            .map(|s| s.trim().trim_matches('`').to_string())
            .filter(|s| !s.is_empty())
            .collect(),
        None => match rest.split_once("expected ") {
            Some((_, one)) => vec![one.trim().trim_matches('`').to_string()],
            None => Vec::new(),
        },
    };
    Some((got.to_string(), expected))
}

/// A `--set` value takes the type of the parameter's default.
fn coerce_param(key: &str, value: &str, default: &Value) -> Result<Value, Diagnostic> {
    let bad = |ty: &str| {
        Diagnostic::new(
            Kind::Param,
            format!("--set {key}={value}: `{key}` is a {ty} parameter"),
        )
        .help(format!("give a {ty} value"))
    };
    Ok(match default {
        Value::Bool(_) => match value {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            _ => return Err(bad("boolean (true/false)")),
        },
        Value::Number(n) if n.is_i64() || n.is_u64() => {
            Value::from(value.parse::<i64>().map_err(|_| bad("integer"))?)
        }
        Value::Number(_) => {
            let f: f64 = value.parse().map_err(|_| bad("number"))?;
            serde_json::Number::from_f64(f)
                .map(Value::Number)
                .ok_or_else(|| bad("number"))?
        }
        Value::Array(_) | Value::Object(_) => {
            serde_json::from_str(value).map_err(|_| bad("JSON list or map"))?
        }
        _ => Value::String(value.to_string()),
    })
}

fn context_json(
    params: &BTreeMap<String, Value>,
    env: &BTreeMap<String, String>,
    inputs: &str,
    epoch: i64,
    git: &GitInfo,
) -> Value {
    serde_json::json!({
        "params": params,
        "env": env,
        "build": { "inputs": inputs, "source_date_epoch": epoch },
        "git": git,
    })
}

fn inputs_digest(
    chain: &[Doc],
    top_dir: &Path,
    templates: &BTreeMap<String, super::render::LoadedTemplate>,
    params: &BTreeMap<String, Value>,
    env: &BTreeMap<String, String>,
    epoch: i64,
    git: &GitInfo,
) -> String {
    let mut h = Sha256::new();
    let mut field = |label: &str, bytes: &[u8]| {
        h.update(label.as_bytes());
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    field("kiln-inputs", b"v1");
    let base = top_dir
        .canonicalize()
        .unwrap_or_else(|_| top_dir.to_path_buf());
    for doc in chain {
        // Names relative to the top recipe's directory, so a checkout's location does not matter.
        let real = doc.path.canonicalize().unwrap_or_else(|_| doc.path.clone());
        let rel = real.strip_prefix(&base).unwrap_or(&real);
        field("recipe", rel.to_string_lossy().as_bytes());
        field("text", doc.text.as_bytes());
    }
    for (name, t) in templates {
        field("template", name.as_bytes());
        field("text", t.text.as_bytes());
    }
    field(
        "params",
        serde_json::to_string(params).unwrap_or_default().as_bytes(),
    );
    field(
        "env",
        serde_json::to_string(env).unwrap_or_default().as_bytes(),
    );
    field("epoch", &epoch.to_le_bytes());
    field("git", git.commit.as_bytes());
    format!("sha256:{}", hex::encode(h.finalize()))
}

/// Deep-merge `over` into `base`: maps merge key by key, everything else is replaced.
fn merge(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_replaces_lists_and_merges_maps() {
        let mut a = serde_json::json!({"disk": {"size": "1G", "partitions": [1, 2]}, "name": "a"});
        merge(
            &mut a,
            serde_json::json!({"disk": {"partitions": [3]}, "name": "b"}),
        );
        assert_eq!(
            a,
            serde_json::json!({"disk": {"size": "1G", "partitions": [3]}, "name": "b"})
        );
    }

    #[test]
    fn unknown_field_parsing() {
        for msg in [
            "unknown field `nmae`, expected one of `name`, `version`",
            "unknown field `nmae`, expected one of name, version",
        ] {
            let (got, exp) = unknown_field(msg).unwrap();
            assert_eq!(got, "nmae");
            assert_eq!(exp, ["name", "version"]);
        }
    }

    #[test]
    fn params_take_the_default_type() {
        assert_eq!(
            coerce_param("n", "3", &Value::from(1)).unwrap(),
            Value::from(3)
        );
        assert!(coerce_param("n", "x", &Value::from(1)).is_err());
        assert_eq!(
            coerce_param("b", "true", &Value::Bool(false)).unwrap(),
            Value::Bool(true)
        );
        assert_eq!(
            coerce_param("s", "1.10", &Value::from("x")).unwrap(),
            Value::from("1.10")
        );
    }
}
