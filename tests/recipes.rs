//! Recipe language through the real `kiln` binary: golden renders of the example recipes, the
//! checked-in JSON Schema, and a table of bad inputs that must each fail with exit code 2, a
//! `file:line:column`, the offending line with a caret, and help — never a panic.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use common::{kiln_no_home as kiln, output, root};

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Compare with a golden file; `UPDATE_GOLDEN=1` rewrites it.
fn golden(name: &str, actual: &str) {
    let path = root().join("tests/golden").join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_GOLDEN=1)", path.display()));
    assert_eq!(
        expected, actual,
        "{name} changed; review and run with UPDATE_GOLDEN=1 to accept"
    );
}

#[test]
fn examples_render_to_their_golden_output() {
    for (recipe, args, out) in [
        ("recipes/minimal.yaml", vec![], "minimal.yaml"),
        (
            "recipes/minimal.yaml",
            vec!["--set", "hostname=demo"],
            "minimal-hostname-demo.yaml",
        ),
        ("recipes/minimal-demo.yaml", vec![], "minimal-demo.yaml"),
    ] {
        let o = output(
            kiln()
                .current_dir(root())
                .arg("render")
                .arg(recipe)
                .args(&args),
        );
        assert!(o.status.success(), "{recipe}: {}", text(&o.stderr));
        golden(out, &text(&o.stdout));
    }
    let o = output(kiln().current_dir(root()).args([
        "render",
        "recipes/minimal.yaml",
        "--set",
        "hostname=demo",
        "--json",
    ]));
    assert!(o.status.success(), "{}", text(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["recipe"]["rootfs"]["hostname"], "demo");
    let inputs = v["build"]["inputs"].as_str().unwrap();
    assert!(
        inputs.starts_with("sha256:") && inputs.len() == 71,
        "{inputs}"
    );
    assert_eq!(
        v["recipe"]["verify"]["expect"],
        format!("kiln-boot-ok {inputs}")
    );
    golden("minimal-hostname-demo.json", &text(&o.stdout));
}

#[test]
fn check_passes_on_every_example() {
    let mut cmd = kiln();
    cmd.current_dir(root()).arg("check");
    for e in std::fs::read_dir(root().join("recipes")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "yaml") {
            cmd.arg(p);
        }
    }
    let o = output(&mut cmd);
    assert!(o.status.success(), "{}{}", text(&o.stdout), text(&o.stderr));
}

#[test]
fn inputs_digest_follows_inputs_not_location() {
    let digest = |dir: &Path, args: &[&str]| {
        let o = output(
            kiln()
                .current_dir(dir)
                .args(["render", "--json", "recipes/minimal.yaml"])
                .args(args),
        );
        assert!(o.status.success(), "{}", text(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["build"]["inputs"].as_str().unwrap().to_string()
    };
    // A copy of the project elsewhere gives the same digest.
    let copy = tempfile::tempdir().unwrap();
    for sub in ["recipes", "templates"] {
        let status = Command::new("cp")
            .arg("-r")
            .arg(root().join(sub))
            .arg(copy.path().join(sub))
            .status()
            .unwrap();
        assert!(status.success());
    }
    let here = digest(&root(), &[]);
    assert_eq!(here, digest(copy.path(), &[]));
    assert_ne!(here, digest(&root(), &["--set", "hostname=other"]));
    // Changing an included template changes the digest.
    let banner = copy.path().join("templates/banner.j2");
    std::fs::write(&banner, "changed\n").unwrap();
    assert_ne!(here, digest(copy.path(), &[]));
}

#[test]
fn schema_file_is_current() {
    let o = output(kiln().arg("schema"));
    assert!(o.status.success());
    let on_disk = std::fs::read_to_string(root().join("recipes/schema.json")).unwrap();
    assert_eq!(
        on_disk.trim(),
        text(&o.stdout).trim(),
        "recipes/schema.json is stale: run `kiln schema > recipes/schema.json`"
    );
}

#[test]
fn completions_and_help() {
    let o = output(kiln().args(["completions", "bash"]));
    assert!(o.status.success());
    assert!(text(&o.stdout).contains("kiln"));
    for sub in [
        "render",
        "check",
        "schema",
        "completions",
        "build",
        "boot",
        "disk",
        "keygen",
        "publish",
        "pull",
        "images",
        "up",
        "worker",
        "submit",
        "watch",
        "status",
        "logs",
    ] {
        let o = output(kiln().args([sub, "--help"]));
        assert!(o.status.success(), "{sub}");
        assert!(
            text(&o.stdout).contains("Example"),
            "{sub} --help has no example"
        );
    }
}

const GOOD: &str = "\
name: t
kernel:
  package: linux-image-cloud-amd64
rootfs:
  files:
    - path: /etc/a
      content: a
disk:
  size: 1G
  partitions:
    - name: esp
      type: esp
      size: 64M
    - name: root
      type: root
      size: auto
";

/// A bad input: the recipe text, extra files, extra args, the expected `line:column` in
/// `r.yaml` (or another file), and a substring of the message.
struct Case {
    name: &'static str,
    recipe: String,
    files: Vec<(&'static str, &'static str)>,
    args: Vec<&'static str>,
    place: &'static str,
    message: &'static str,
}

fn case(
    name: &'static str,
    recipe: impl Into<String>,
    place: &'static str,
    message: &'static str,
) -> Case {
    Case {
        name,
        recipe: recipe.into(),
        files: vec![],
        args: vec![],
        place,
        message,
    }
}

#[test]
fn bad_inputs_fail_with_place_caret_and_help() {
    let cases = vec![
        case(
            "yaml syntax",
            "name: t\nkernel: [a,\n  b: c\n",
            "r.yaml:2:9",
            "expected",
        ),
        case(
            "template syntax",
            "name: {{ params.x \n",
            "r.yaml:1:",
            "syntax error",
        ),
        case(
            "undefined variable",
            GOOD.replace("content: a", "content: \"{{ params.nope }}\""),
            "r.yaml:7:",
            "undefined",
        ),
        case(
            "undeclared env variable",
            GOOD.replace("content: a", "content: \"{{ env.HOME }}\""),
            "r.yaml:7:",
            "undefined",
        ),
        case(
            "unknown field with suggestion",
            GOOD.replace("name: t", "nmae: t"),
            "r.yaml:1:1",
            "unknown field `nmae`",
        ),
        case(
            "unknown nested field",
            GOOD.replace("  partitions:", "  partitons:"),
            "r.yaml:10:3",
            "did you mean `partitions`",
        ),
        case(
            "wrong type",
            format!("{GOOD}verify:\n  timeout: soon\n"),
            "r.yaml:18:",
            "invalid",
        ),
        case(
            "partitions larger than disk",
            GOOD.replace("size: 1G", "size: 100M")
                .replace("size: auto", "size: 200M"),
            "r.yaml:9:3",
            "need 266 MiB (264 MiB plus 2 MiB for the partition table and alignment) but the disk is 100 MiB",
        ),
        case(
            "two root partitions",
            format!("{GOOD}    - name: root2\n      type: root\n"),
            "r.yaml:18:",
            "two root partitions",
        ),
        case(
            "relative image path",
            GOOD.replace("path: /etc/a", "path: etc/a"),
            "r.yaml:6:",
            "is relative",
        ),
        case(
            "dotdot image path",
            GOOD.replace("path: /etc/a", "path: /etc/../a"),
            "r.yaml:6:",
            "`..`",
        ),
        case(
            "duplicate image path",
            GOOD.replace(
                "      content: a\n",
                "      content: a\n    - path: /etc/a\n      content: b\n",
            ),
            "r.yaml:8:",
            "given twice",
        ),
        case(
            "missing template",
            GOOD.replace("content: a", "template: nope.j2"),
            "r.yaml:7:",
            "template `nope.j2` not found",
        ),
        Case {
            files: vec![("secret.txt", "s")],
            ..case(
                "include escapes its root",
                format!("{{% include \"../secret.txt\" %}}\n{GOOD}"),
                "r.yaml:1:",
                "leaves the template roots",
            )
        },
        Case {
            files: vec![("proj/templates/evil.j2", "")],
            ..case(
                "template symlink escapes",
                GOOD.replace("content: a", "template: link.j2"),
                "r.yaml:7:",
                "outside its root",
            )
        },
        Case {
            args: vec!["--set", "hostnmae=x"],
            ..case(
                "unknown --set parameter",
                format!("params:\n  hostname: a\n{GOOD}"),
                "",
                "no parameter `hostnmae`",
            )
        },
        Case {
            args: vec!["--set", "count=many"],
            ..case(
                "--set of the wrong type",
                format!("params:\n  count: 1\n{GOOD}"),
                "",
                "integer",
            )
        },
        Case {
            files: vec![("outside.yaml", "name: x\n")],
            ..case(
                "extends outside the project",
                format!("extends: ../../outside.yaml\n{GOOD}"),
                "r.yaml:1:1",
                "outside the project",
            )
        },
        case(
            "extends a missing base",
            format!("extends: nope.yaml\n{GOOD}"),
            "r.yaml:1:1",
            "cannot read base recipe",
        ),
        case(
            "templated preamble",
            format!("params:\n  a: \"{{{{ 1 }}}}\"\n{GOOD}"),
            "r.yaml:2:",
            "plain YAML",
        ),
        case(
            "no root partition",
            GOOD.replace("type: root", "type: data"),
            "r.yaml:10:",
            "no root partition",
        ),
        case(
            "bad mode",
            GOOD.replace("content: a", "content: a\n      mode: \"999\""),
            "r.yaml:8:",
            "not an octal",
        ),
        case(
            "relative home",
            GOOD.replace(
                "      content: a\n",
                "      content: a\n  users:\n    - name: admin\n      home: home/admin\n",
            ),
            "r.yaml:10:7",
            "home directory `home/admin` is relative",
        ),
        case(
            "empty password hash",
            GOOD.replace(
                "      content: a\n",
                "      content: a\n  users:\n    - name: admin\n      password_hash: \"\"\n",
            ),
            "r.yaml:10:7",
            "log in without a password",
        ),
        case(
            "second key smuggled into one",
            GOOD.replace(
                "      content: a\n",
                "      content: a\n  users:\n    - name: admin\n      ssh_authorized_keys:\n        - \"ssh-ed25519 A\\nssh-rsa B\"\n",
            ),
            "r.yaml:11:11",
            "SSH key `ssh-ed25519 A\\nssh-rsa B` contains the control character",
        ),
        case(
            "hostname with a newline",
            GOOD.replace("      content: a\n", "      content: a\n  hostname: \"a\\n10.0.0.1 b\"\n"),
            "r.yaml:8:3",
            "hostname `a\\n10.0.0.1 b`",
        ),
        case(
            "time zone leaving zoneinfo",
            GOOD.replace("      content: a\n", "      content: a\n  timezone: ../../../etc/shadow\n"),
            "r.yaml:8:3",
            "is not a time zone name",
        ),
        case(
            "suite that is an option",
            GOOD.replace("      content: a\n", "      content: a\n  suite: --customize-hook=id\n"),
            "r.yaml:8:3",
            "is not a suite or component name",
        ),
        case(
            "mountpoint leaving the image",
            format!("{GOOD}    - name: data\n      type: data\n      mountpoint: /srv/../..\n"),
            "r.yaml:19:7",
            "mountpoint `/srv/../..` has a `.` or `..` component",
        ),
    ];
    let mut failures = Vec::new();
    for c in cases {
        let dir = tempfile::tempdir().unwrap();
        // Layout: <tmp>/outside.yaml, <tmp>/secret.txt, <tmp>/proj/templates/, <tmp>/proj/recipes/r.yaml
        let proj = dir.path().join("proj");
        let recipes = proj.join("recipes");
        std::fs::create_dir_all(&recipes).unwrap();
        std::fs::create_dir_all(proj.join("templates")).unwrap();
        for (p, t) in &c.files {
            let at = if p.starts_with("proj/") {
                dir.path().join(p)
            } else if *p == "secret.txt" {
                proj.join("secret.txt")
            } else {
                dir.path().join(p)
            };
            std::fs::create_dir_all(at.parent().unwrap()).unwrap();
            std::fs::write(at, t).unwrap();
        }
        if c.name == "template symlink escapes" {
            std::os::unix::fs::symlink(
                dir.path().join("outside.txt"),
                proj.join("templates/link.j2"),
            )
            .unwrap();
            std::fs::write(dir.path().join("outside.txt"), "secret").unwrap();
        }
        if c.name == "include escapes its root" {
            std::fs::write(proj.join("secret.txt"), "s").unwrap();
        }
        std::fs::write(recipes.join("r.yaml"), &c.recipe).unwrap();
        let o = output(
            kiln()
                .current_dir(&recipes)
                .args(["check", "r.yaml"])
                .args(&c.args)
                .env("HOME", "/root"),
        );
        let err = text(&o.stderr);
        let mut why = Vec::new();
        if o.status.code() != Some(2) {
            why.push(format!("exit code {:?}, want 2", o.status.code()));
        }
        if err.contains("panicked") {
            why.push("panicked".into());
        }
        if !err.contains(c.message) {
            why.push(format!("message lacks {:?}", c.message));
        }
        if !c.place.is_empty() {
            if !err.contains(c.place) {
                why.push(format!("no place {:?}", c.place));
            }
            if !err
                .lines()
                .any(|l| l.trim_start().starts_with("| ") && l.trim_end().ends_with('^'))
            {
                why.push("no caret line".into());
            }
        }
        if !err.contains("help:") {
            why.push("no help".into());
        }
        if !why.is_empty() {
            failures.push(format!("--- {}: {}\n{err}", c.name, why.join("; ")));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A value that would add a line to /etc/passwd (a second root account) is refused at the field,
/// before anything is built, and the error shows it escaped on one line.
#[test]
fn injected_account_lines_are_refused_at_the_field() {
    let recipe = GOOD.replace(
        "      content: a\n",
        "      content: a\n  users:\n    - name: admin\n      shell: \"/bin/sh\\nroot2::0:0::/:/bin/sh\"\n",
    );
    let dir = project(&recipe, &[]);
    let o = output(
        kiln()
            .current_dir(dir.path().join("proj/recipes"))
            .args(["check", "r.yaml"]),
    );
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("--> r.yaml:10:7"), "{err}");
    assert!(
        err.contains("error: login shell `/bin/sh\\nroot2::0:0::/:/bin/sh` contains the control character `\\n`"),
        "{err}"
    );
    assert!(err.contains("10 |       shell: \"/bin/sh\\nroot2"), "{err}");
    assert!(
        err.contains("help: write the shell's absolute path"),
        "{err}"
    );
    assert!(
        !err.contains("\nroot2::0:0"),
        "a raw newline reached the output: {err}"
    );
}

/// How a `kiln` run ended and what it cost: exit code, stderr, wall time and the peak RSS in KiB
/// of the process and of the children it waited for (its render children), from `wait4`.
struct Measured {
    code: Option<i32>,
    stderr: String,
    elapsed: std::time::Duration,
    peak_rss_kib: i64,
}

// wait4 reaps the child (std cannot return its rusage); waiting on the handle again could reap
// another test's child that reused the pid.
#[allow(clippy::zombie_processes)]
fn run_measured(cmd: &mut Command) -> Measured {
    use std::io::Read;
    let start = std::time::Instant::now();
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start kiln");
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        stderr
            .read_to_string(&mut text)
            .expect("read kiln's stderr");
        text
    });
    let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
    let mut status = 0;
    // SAFETY: rusage is plain data that wait4 fills in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child; std's handle is not used to wait afterwards.
    let reaped = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(reaped, pid, "wait4: {}", std::io::Error::last_os_error());
    let elapsed = start.elapsed();
    Measured {
        code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
        stderr: reader.join().expect("stderr reader"),
        elapsed,
        peak_rss_kib: usage.ru_maxrss,
    }
}

/// A throwaway project: `<tmp>/proj/recipes/r.yaml` and `<tmp>/proj/templates/…`.
fn project(recipe: &str, templates: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let proj = dir.path().join("proj");
    std::fs::create_dir_all(proj.join("recipes")).unwrap();
    std::fs::create_dir_all(proj.join("templates")).unwrap();
    std::fs::write(proj.join("recipes/r.yaml"), recipe).unwrap();
    for (name, text) in templates {
        std::fs::write(proj.join("templates").join(name), text).unwrap();
    }
    dir
}

/// Templates that try to take unbounded time or memory in one step. Each must fail as a recipe
/// error (exit 2) that names the limit, at a place, within seconds and with bounded memory.
#[test]
fn template_bombs_fail_fast_with_bounded_memory() {
    let dag = "{% set a = [1, 1] %}".to_string() + &"{% set a = [a, a] %}".repeat(30);
    let big_template = "{% for i in range(15000) %}\n{{ 'x' * 1000 }}\n{% endfor %}\n";
    let five_big_files = GOOD.replace(
        "      content: a\n",
        &(0..5)
            .map(|i| format!("      template: big.j2\n    - path: /etc/big{i}\n"))
            .collect::<String>()
            .replacen("    - path: /etc/big4\n", "", 1),
    );
    let huge_recipe = format!("{GOOD}{}", "# padding\n".repeat(500_000));
    /// What, recipe, templates, message, place.
    type Bomb<'a> = (&'a str, String, Vec<(&'a str, String)>, &'a str, &'a str);
    let cases: Vec<Bomb> = vec![
        (
            "string repeated a billion times",
            format!("# {{{{ 'x' * 1000000000 }}}}\n{GOOD}"),
            vec![],
            "limit of 2000000 fuel",
            "r.yaml:1:",
        ),
        (
            "range of a billion",
            format!("# {{{{ range(1000000000)|join }}}}\n{GOOD}"),
            vec![],
            "range has too many elements",
            "r.yaml:1:",
        ),
        (
            "loops in loops",
            format!(
                "{{% for i in range(100000) %}}{{% for j in range(100000) %}}{{% endfor %}}\
                 {{% endfor %}}\n{GOOD}"
            ),
            vec![],
            "limit of 2000000 fuel",
            "r.yaml:1:",
        ),
        (
            "a long list repeated and joined",
            format!("# {{{{ (range(100000)|list * 100000)|join }}}}\n{GOOD}"),
            vec![],
            "repeated sequence is too large",
            "r.yaml:1:",
        ),
        (
            "sorting a long list",
            format!("# {{{{ (range(100000)|list * 1000)|sort|length }}}}\n{GOOD}"),
            vec![],
            "limit of 2000000 fuel",
            "r.yaml:1:",
        ),
        (
            "a string doubled forty times",
            format!(
                "{{% set ns = namespace(s='x') %}}{{% for i in range(40) %}}\
                 {{% set ns.s = ns.s ~ ns.s %}}{{% endfor %}}# {{{{ ns.s|length }}}}\n{GOOD}"
            ),
            vec![],
            "limit of 2000000 fuel",
            "r.yaml:1:",
        ),
        (
            "a macro calling itself twice",
            format!(
                "{{% macro f(n) %}}{{% if n %}}{{{{ f(n-1) }}}}{{{{ f(n-1) }}}}{{% endif %}}\
                 {{% endmacro %}}# {{{{ f(30) }}}}\n{GOOD}"
            ),
            vec![],
            "limit of 2000000 fuel",
            "r.yaml:1:",
        ),
        (
            "a macro calling itself without end",
            format!("{{% macro f() %}}{{{{ f() }}}}{{% endmacro %}}# {{{{ f() }}}}\n{GOOD}"),
            vec![],
            "limit of 500 levels",
            "r.yaml:1:",
        ),
        (
            "a recipe including itself",
            format!("{{% include 'r.yaml' %}}\n{GOOD}"),
            vec![],
            "limit of 500 levels",
            "r.yaml:1:",
        ),
        (
            "20 MB of output",
            format!(
                "{{% for i in range(20000) %}}\n# {{{{ 'x' * 1000 }}}}\n{{% endfor %}}\n{GOOD}"
            ),
            vec![],
            "limit of 16 MiB per rendered file",
            "r.yaml:2:",
        ),
        (
            "a list nested in itself, displayed",
            format!("{dag}# {{{{ a }}}}\n{GOOD}"),
            vec![],
            "limit of 16 MiB per rendered file",
            "r.yaml:1:",
        ),
        (
            "75 MB over five templates",
            five_big_files,
            vec![("big.j2", big_template.to_string())],
            "limit of 64 MiB in total",
            "templates/big.j2:2:",
        ),
        (
            "a recipe of 5 MB",
            huge_recipe,
            vec![],
            "larger than the limit of 4 MiB",
            "",
        ),
        (
            "a template of 5 MB",
            GOOD.replace("content: a", "template: huge.j2"),
            vec![("huge.j2", "x".repeat(5 << 20))],
            "larger than the limit of 4 MiB",
            "r.yaml:7:",
        ),
    ];
    let mut failures = Vec::new();
    for (name, recipe, templates, message, place) in cases {
        let templates: Vec<(&str, &str)> =
            templates.iter().map(|(n, t)| (*n, t.as_str())).collect();
        let dir = project(&recipe, &templates);
        let m = run_measured(
            kiln()
                .current_dir(dir.path().join("proj/recipes"))
                .args(["render", "r.yaml"]),
        );
        let mut why = Vec::new();
        if m.code != Some(2) {
            why.push(format!("exit code {:?}, want 2", m.code));
        }
        if !m.stderr.contains(message) {
            why.push(format!("message lacks {message:?}"));
        }
        if !place.is_empty() && !m.stderr.contains(place) {
            why.push(format!("no place {place:?}"));
        }
        if !m.stderr.contains("help:") {
            why.push("no help".into());
        }
        if m.elapsed > std::time::Duration::from_secs(10) {
            why.push(format!("took {:?}", m.elapsed));
        }
        if m.peak_rss_kib > 256 << 10 {
            why.push(format!("peak RSS {} MiB", m.peak_rss_kib >> 10));
        }
        eprintln!(
            "{name}: exit {:?} in {:.2?}, peak RSS {} MiB",
            m.code,
            m.elapsed,
            m.peak_rss_kib >> 10
        );
        if !why.is_empty() {
            failures.push(format!("--- {name}: {}\n{}", why.join("; "), m.stderr));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// What fuel does not charge: walks over lists that share their items (built cheaply, displayed,
/// serialized or concatenated exponentially large), and memory beyond the render child's
/// address space. A render child stops them at its time or memory limit; the parent reports
/// which, at the start of the file, and is not harmed.
#[test]
fn render_children_stop_what_fuel_does_not_charge() {
    use kiln::recipe::{DiagnosticKind, Limits, LoadOptions};
    kiln::recipe::sandbox::enable(PathBuf::from(env!("CARGO_BIN_EXE_kiln")));
    let limits = Limits {
        // Enough fuel for 360 MB of strings, so that the address space is what stops them.
        fuel: 10_000_000,
        render_timeout: std::time::Duration::from_secs(1),
        max_memory: 256 << 20,
        ..Limits::default()
    };
    let time = "longer than the limit of 1 s";
    let memory = "more memory than the limit of 256 MiB";
    let dag = "{% set a = [1, 1] %}".to_string() + &"{% set a = [a, a] %}".repeat(30);
    let cases = [
        (
            "serialized",
            format!("{dag}# {{{{ a|tojson|length }}}}\n{GOOD}"),
            time,
        ),
        (
            "concatenated",
            format!("{dag}# {{{{ ('' ~ a)|length }}}}\n{GOOD}"),
            time,
        ),
        (
            "joined",
            format!("{dag}# {{{{ a|join|length }}}}\n{GOOD}"),
            time,
        ),
        (
            "made a string",
            format!("{dag}# {{{{ a|string|length }}}}\n{GOOD}"),
            time,
        ),
        (
            "strings of 360 MB",
            format!("# {{{{ ('x' * 90000000 ~ 'y' * 90000000)|length }}}}\n{GOOD}"),
            memory,
        ),
    ];
    let mut failures = Vec::new();
    for (name, recipe, limit) in cases {
        let dir = project(&recipe, &[]);
        let path = dir.path().join("proj/recipes/r.yaml");
        let start = std::time::Instant::now();
        let result = kiln::recipe::load(
            &path,
            &LoadOptions {
                limits: limits.clone(),
                ..LoadOptions::default()
            },
        );
        let elapsed = start.elapsed();
        let Err(d) = result else {
            failures.push(format!("{name}: loaded"));
            continue;
        };
        eprintln!("{name}: {elapsed:.2?}: {}", d.message);
        let at_start = d.location().is_some_and(|l| l.ends_with("r.yaml:1:1"));
        if d.kind != DiagnosticKind::Limit
            || !d.message.contains(limit)
            || !at_start
            || d.help.is_none()
        {
            failures.push(format!("{name}: {d}"));
        }
        // The timeout, the 1 s the child gets beyond it, and slack for a busy machine.
        if elapsed > std::time::Duration::from_secs(5) {
            failures.push(format!("{name}: took {elapsed:?}"));
        }
    }
    // The same limits leave an ordinary recipe alone.
    let dir = project(GOOD, &[]);
    let good = kiln::recipe::load(
        &dir.path().join("proj/recipes/r.yaml"),
        &LoadOptions {
            limits: limits.clone(),
            ..LoadOptions::default()
        },
    );
    if let Err(d) = good {
        failures.push(format!("the good recipe: {d}"));
    }
    // Every child this process waited for stayed within its address-space limit.
    // SAFETY: rusage is plain data that getrusage fills in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes only the struct it is given.
    assert_eq!(
        unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) },
        0
    );
    assert!(
        usage.ru_maxrss <= 256 << 10,
        "a child used {} MiB",
        usage.ru_maxrss >> 10
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
