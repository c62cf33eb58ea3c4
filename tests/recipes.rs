//! Recipe language through the real `kiln` binary: golden renders of the example recipes, the
//! checked-in JSON Schema, and a table of bad inputs that must each fail with exit code 2, a
//! `file:line:column`, the offending line with a caret, and help — never a panic.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn kiln() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("run kiln")
}

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
        let o = run(kiln()
            .current_dir(root())
            .arg("render")
            .arg(recipe)
            .args(&args));
        assert!(o.status.success(), "{recipe}: {}", text(&o.stderr));
        golden(out, &text(&o.stdout));
    }
    let o = run(kiln().current_dir(root()).args([
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
    let o = run(&mut cmd);
    assert!(o.status.success(), "{}{}", text(&o.stdout), text(&o.stderr));
}

#[test]
fn inputs_digest_follows_inputs_not_location() {
    let digest = |dir: &Path, args: &[&str]| {
        let o = run(kiln()
            .current_dir(dir)
            .args(["render", "--json", "recipes/minimal.yaml"])
            .args(args));
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
    let o = run(kiln().arg("schema"));
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
    let o = run(kiln().args(["completions", "bash"]));
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
        let o = run(kiln().args([sub, "--help"]));
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
        let o = run(kiln()
            .current_dir(&recipes)
            .args(["check", "r.yaml"])
            .args(&c.args)
            .env("HOME", "/root"));
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
