//! Recipes from git: real repositories made with git2 in temp dirs (the crate's recipes/ and
//! templates/ copied in), checked out by branch, tag and commit id through kiln's cached mirror;
//! the watcher turning commits into triggers.

use git2::{Repository, RepositoryInitOptions, Signature, Time};
use kiln::source::{GitMirror, SourceError, load_options_for};
use kiln::watch::Watcher;
use std::cell::RefCell;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

mod common;
use common::{commit_all, copy_dir};

const T1: i64 = 1_600_000_000;
const T2: i64 = 1_650_000_000;

struct Fixture {
    _tmp: tempfile::TempDir,
    work: PathBuf,
    home: PathBuf,
    outside: PathBuf,
    repo: Repository,
    c1: String,
    c2: String,
}

/// A repository with two commits on `main`: c1 (T1, VERSION=1) is also branch `stable` and
/// annotated tag `v1`; c2 (T2, VERSION=2) is main's head.
fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("repo");
    let home = tmp.path().join("home");
    let outside = tmp.path().join("outside.yaml");
    fs::write(&outside, "name: outside\n").unwrap();
    let mut opts = RepositoryInitOptions::new();
    opts.initial_head("main");
    let repo = Repository::init_opts(&work, &opts).unwrap();
    let root = common::root();
    copy_dir(&root.join("recipes"), &work.join("recipes"));
    copy_dir(&root.join("templates"), &work.join("templates"));
    // The watcher tests count recipes: keep the two busybox examples only, whatever else the
    // project's recipes/ holds.
    for entry in fs::read_dir(work.join("recipes")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        if name.ends_with(".yaml") && name != "minimal.yaml" && name != "minimal-demo.yaml" {
            fs::remove_file(&path).unwrap();
        }
    }
    // A recipe without source_date_epoch (outside the watched glob).
    let minimal = fs::read_to_string(work.join("recipes/minimal.yaml")).unwrap();
    let no_epoch: String = minimal
        .lines()
        .filter(|l| !l.starts_with("source_date_epoch"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_ne!(no_epoch, minimal);
    fs::create_dir_all(work.join("extra")).unwrap();
    fs::write(work.join("extra/noepoch.yaml"), no_epoch).unwrap();
    fs::create_dir_all(work.join("scripts")).unwrap();
    fs::write(work.join("scripts/run.sh"), "#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(
        work.join("scripts/run.sh"),
        fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::os::unix::fs::symlink("recipes/minimal.yaml", work.join("link.yaml")).unwrap();
    std::os::unix::fs::symlink(&outside, work.join("escape.yaml")).unwrap();
    fs::write(work.join("README"), "readme\n").unwrap();
    fs::write(work.join("VERSION"), "1\n").unwrap();
    let c1 = commit_all(&repo, "first", T1);
    {
        let commit = repo.find_commit(git2::Oid::from_str(&c1).unwrap()).unwrap();
        repo.branch("stable", &commit, false).unwrap();
        let sig = Signature::new("kiln test", "test@example.org", &Time::new(T1, 0)).unwrap();
        repo.tag("v1", commit.as_object(), &sig, "release 1", false)
            .unwrap();
    }
    fs::write(work.join("VERSION"), "2\n").unwrap();
    let c2 = commit_all(&repo, "second", T2);
    Fixture {
        _tmp: tmp,
        work,
        home,
        outside,
        repo,
        c1,
        c2,
    }
}

fn source(f: &Fixture) -> GitMirror {
    GitMirror::with_home(f.work.to_str().unwrap(), &f.home).unwrap()
}

#[test]
fn checkout_by_branch_tag_and_commit() {
    let f = fixture();
    let src = source(&f);

    let main = src.checkout("main", "recipes/minimal.yaml").unwrap();
    assert!(main.cloned, "first use clones");
    assert_eq!(main.commit, f.c2);
    assert_eq!(main.time, T2);
    assert_eq!(main.reference, "main");
    assert_eq!(main.dir.parent(), Some(f.home.join("checkouts").as_path()));
    let dir_name = main.dir.file_name().unwrap().to_string_lossy().into_owned();
    assert!(dir_name.starts_with(&format!("{}-", f.c2)), "{dir_name}");
    assert_eq!(main.recipe_path, main.dir.join("recipes/minimal.yaml"));
    assert_eq!(fs::read_to_string(main.dir.join("VERSION")).unwrap(), "2\n");
    assert_eq!(
        fs::read(&main.recipe_path).unwrap(),
        fs::read(f.work.join("recipes/minimal.yaml")).unwrap()
    );
    // Modes and symlinks come from git.
    let mode = fs::metadata(main.dir.join("scripts/run.sh"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o755);
    let mode = fs::metadata(main.dir.join("README"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o644);
    assert_eq!(
        fs::read_link(main.dir.join("link.yaml")).unwrap(),
        PathBuf::from("recipes/minimal.yaml")
    );
    // Only the live checkout is on disk.
    let entries: Vec<_> = fs::read_dir(f.home.join("checkouts"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(entries, vec![std::ffi::OsString::from(&dir_name)]);

    for reference in ["stable", "v1", f.c1.as_str(), &f.c1[..10]] {
        let c = src.checkout(reference, "recipes/minimal.yaml").unwrap();
        assert_eq!(c.commit, f.c1, "{reference}");
        assert_eq!(c.time, T1, "{reference}");
        assert_eq!(c.reference, reference);
        assert!(!c.cloned, "{reference}: the mirror is reused");
        assert_eq!(fs::read_to_string(c.dir.join("VERSION")).unwrap(), "1\n");
    }

    // A recipe reached through an in-repository symlink is fine.
    let linked = src.checkout("main", "link.yaml").unwrap();
    assert!(linked.recipe_path.is_file());
    drop(linked);

    // file:// URLs work too (their own mirror).
    let url = format!("file://{}", f.work.display());
    let by_url = GitMirror::with_home(&url, &f.home).unwrap();
    assert_ne!(by_url.mirror_dir(), src.mirror_dir());
    let c = by_url.checkout("v1", "recipes/minimal.yaml").unwrap();
    assert!(c.cloned);
    assert_eq!(c.commit, f.c1);
    // Every checkout but the live ones is gone; dropping those leaves nothing.
    assert_eq!(fs::read_dir(f.home.join("checkouts")).unwrap().count(), 2);
    drop((c, main));
    assert_eq!(fs::read_dir(f.home.join("checkouts")).unwrap().count(), 0);
}

#[test]
fn second_checkout_reuses_the_mirror_in_a_directory_of_its_own() {
    let f = fixture();
    let src = source(&f);
    let first = src.checkout("main", "recipes/minimal.yaml").unwrap();
    assert!(first.cloned);
    let mirror = src.mirror_dir();
    assert!(mirror.join("HEAD").is_file(), "a bare mirror");
    assert!(mirror.starts_with(f.home.join("git")));
    let mark = first.dir.join(".kiln-test-mark");
    fs::write(&mark, "x").unwrap();
    let second = src.checkout("main", "recipes/minimal.yaml").unwrap();
    assert!(!second.cloned, "no second clone");
    // Two builds of one commit never share (or remove) each other's checkout.
    assert_ne!(second.dir, first.dir);
    assert!(!second.dir.join(".kiln-test-mark").exists());
    let (first_dir, second_dir) = (first.dir.clone(), second.dir.clone());
    let clone = first.clone();
    drop(first);
    assert!(first_dir.is_dir(), "a clone keeps the checkout");
    drop(clone);
    assert!(!first_dir.exists(), "the last drop removes it");
    assert!(second_dir.join("VERSION").is_file());
    drop(second);
    assert!(!second_dir.exists());
    // The mirror stays: it is the cache.
    assert!(mirror.join("HEAD").is_file());
    assert_eq!(fs::read_dir(f.home.join("git")).unwrap().count(), 1);
    // A new GitMirror for the same path (given differently) uses the same mirror.
    let again = GitMirror::with_home(&format!("{}/./", f.work.display()), &f.home).unwrap();
    assert_eq!(again.mirror_dir(), mirror);
}

#[test]
fn new_commit_on_branch_is_fetched() {
    let f = fixture();
    let src = source(&f);
    assert_eq!(src.checkout("main", "VERSION").unwrap().commit, f.c2);
    fs::write(f.work.join("VERSION"), "3\n").unwrap();
    let c3 = commit_all(&f.repo, "third", T2 + 100);
    let c = src.checkout("main", "VERSION").unwrap();
    assert!(!c.cloned);
    assert_eq!(c.commit, c3);
    assert_eq!(c.time, T2 + 100);
    assert_eq!(fs::read_to_string(&c.recipe_path).unwrap(), "3\n");
    // A new tag is fetched as well.
    let commit = f
        .repo
        .find_commit(git2::Oid::from_str(&c3).unwrap())
        .unwrap();
    f.repo
        .tag_lightweight("v3", commit.as_object(), false)
        .unwrap();
    assert_eq!(src.resolve("v3").unwrap(), (c3, T2 + 100));
}

#[test]
fn bad_refs_paths_and_repositories_are_clear_errors() {
    let f = fixture();
    let src = source(&f);

    let e = src.checkout("nope", "recipes/minimal.yaml").unwrap_err();
    assert!(matches!(e, SourceError::UnknownRef { .. }), "{e:?}");
    let msg = e.to_string();
    for want in ["\"nope\"", "main", "stable", "v1"] {
        assert!(msg.contains(want), "{msg} lacks {want}");
    }

    for bad in [
        "../outside.yaml",
        "recipes/../../outside.yaml",
        "/etc/passwd",
    ] {
        let e = src.checkout("main", bad).unwrap_err();
        assert!(
            matches!(e, SourceError::BadRecipePath { .. }),
            "{bad}: {e:?}"
        );
    }
    let e = src.checkout("main", "escape.yaml").unwrap_err();
    assert!(matches!(e, SourceError::RecipeEscapes { .. }), "{e:?}");
    assert!(e.to_string().contains(&*f.outside.to_string_lossy()));

    let e = src.checkout("main", "recipes/missing.yaml").unwrap_err();
    assert!(matches!(e, SourceError::MissingRecipe { .. }), "{e:?}");
    assert!(e.to_string().contains("recipes/missing.yaml"));
    // extra/noepoch.yaml exists at c2, VERSION2 only at... a directory is not a recipe.
    let e = src.checkout("main", "recipes").unwrap_err();
    assert!(matches!(e, SourceError::MissingRecipe { .. }), "{e:?}");

    let gone = f.work.parent().unwrap().join("no-such-repo");
    let e = GitMirror::with_home(gone.to_str().unwrap(), &f.home).unwrap_err();
    assert!(matches!(e, SourceError::NoSuchPath { .. }), "{e:?}");
    let url = format!("file://{}", gone.display());
    let e = GitMirror::with_home(&url, &f.home)
        .unwrap()
        .checkout("main", "recipes/minimal.yaml")
        .unwrap_err();
    assert!(matches!(e, SourceError::Unreachable { .. }), "{e:?}");
    assert!(e.to_string().contains(&url));
    // Nothing half-made is left for the failed clone.
    assert_eq!(fs::read_dir(f.home.join("git")).unwrap().count(), 1);
    // http:// to a closed loopback port: unreachable, not a crash.
    let e = GitMirror::with_home("http://127.0.0.1:9/repo.git", &f.home)
        .unwrap()
        .checkout("main", "recipes/minimal.yaml")
        .unwrap_err();
    assert!(matches!(e, SourceError::Unreachable { .. }), "{e:?}");
    let e = GitMirror::with_home("ssh://example.org/repo.git", &f.home).unwrap_err();
    assert!(matches!(e, SourceError::UnsupportedScheme { .. }), "{e:?}");
}

#[test]
fn commit_time_becomes_source_date_epoch() {
    let f = fixture();
    let src = source(&f);
    let c = src.checkout("v1", "extra/noepoch.yaml").unwrap();
    let loaded = kiln::recipe::load(&c.recipe_path, &load_options_for(&c, Vec::new())).unwrap();
    assert_eq!(loaded.source_date_epoch, T1);
    assert_eq!(loaded.context["git"]["commit"], f.c1.as_str());
    assert_eq!(loaded.context["git"]["ref"], "v1");

    // A recipe that sets its epoch keeps it; --set overrides pass through.
    let c = src.checkout("main", "recipes/minimal.yaml").unwrap();
    let opts = load_options_for(&c, vec![("hostname".into(), "from-git".into())]);
    assert_eq!(
        opts.templates_dir.as_deref(),
        Some(c.dir.join("templates").as_path())
    );
    let loaded = kiln::recipe::load(&c.recipe_path, &opts).unwrap();
    assert_eq!(loaded.source_date_epoch, 1_700_000_000);
    assert_eq!(loaded.params["hostname"], "from-git");
}

fn watcher(f: &Fixture, state: &Path) -> Watcher {
    Watcher::with_source(source(f), "main", "recipes/*.yaml", state).unwrap()
}

fn paths(triggers: &[kiln::watch::Trigger]) -> Vec<&str> {
    triggers.iter().map(|t| t.recipe_path.as_str()).collect()
}

#[test]
fn watcher_triggers_on_changed_inputs_only() {
    let f = fixture();
    // A recipe that reads no motd/banner template, and one that does not load.
    let minimal = fs::read_to_string(f.work.join("recipes/minimal.yaml")).unwrap();
    let plain = minimal
        .replace("name: minimal\n", "name: plain\n")
        .replace("      template: motd.j2\n", "      content: \"plain\\n\"\n");
    assert_ne!(plain, minimal);
    fs::write(f.work.join("recipes/plain.yaml"), plain).unwrap();
    fs::write(
        f.work.join("recipes/broken.yaml"),
        "name: broken\nnmae: x\n",
    )
    .unwrap();
    let head = commit_all(&f.repo, "more recipes", T2 + 10);
    let state = f.home.join("watch-state.json");

    let mut w = watcher(&f, &state);
    let first = w.poll().unwrap();
    assert_eq!(
        paths(&first),
        [
            "recipes/broken.yaml",
            "recipes/minimal-demo.yaml",
            "recipes/minimal.yaml",
            "recipes/plain.yaml"
        ],
        "first poll: every recipe"
    );
    for t in &first {
        assert_eq!(t.commit, head);
        assert_eq!(t.reference, "main");
        assert!(t.file.is_file());
        if t.recipe_path == "recipes/broken.yaml" {
            let e = t.error.as_ref().expect("broken recipe carries its error");
            assert!(e.to_string().contains("nmae"), "{e}");
            assert!(t.inputs.is_empty());
        } else {
            assert!(t.error.is_none(), "{}: {:?}", t.recipe_path, t.error);
            // The inputs the build will compute from the same checkout.
            let c = source(&f).checkout(&head, &t.recipe_path).unwrap();
            let loaded = kiln::recipe::load(
                &c.recipe_path,
                &load_options_for(
                    &kiln::source::Checkout {
                        reference: "main".into(),
                        ..c.clone()
                    },
                    Vec::new(),
                ),
            )
            .unwrap();
            assert_eq!(t.inputs, loaded.inputs, "{}", t.recipe_path);
        }
    }
    let saved: serde_json::Value = serde_json::from_slice(&fs::read(&state).unwrap()).unwrap();
    assert_eq!(saved["commit"], head.as_str());

    assert!(w.poll().unwrap().is_empty(), "no new commit: nothing");

    fs::write(f.work.join("README"), "more words\n").unwrap();
    commit_all(&f.repo, "docs", T2 + 20);
    assert!(w.poll().unwrap().is_empty(), "README-only commit: nothing");

    // banner.j2 is included by motd.j2, which minimal and minimal-demo use; plain does not.
    fs::write(f.work.join("templates/banner.j2"), "Welcome, changed.\n").unwrap();
    let c = commit_all(&f.repo, "banner", T2 + 30);
    let t = w.poll().unwrap();
    assert_eq!(
        paths(&t),
        ["recipes/minimal-demo.yaml", "recipes/minimal.yaml"]
    );
    assert!(t.iter().all(|t| t.commit == c));

    // A restart: a new watcher on the same state file triggers nothing for the same commit...
    let mut w2 = watcher(&f, &state);
    assert!(w2.poll().unwrap().is_empty(), "state survives a restart");
    // ...and only what changed after it.
    let demo = fs::read_to_string(f.work.join("recipes/minimal-demo.yaml")).unwrap();
    fs::write(
        f.work.join("recipes/minimal-demo.yaml"),
        demo.replace("hostname: kiln-demo", "hostname: kiln-demo2"),
    )
    .unwrap();
    commit_all(&f.repo, "demo hostname", T2 + 40);
    drop(w2);
    let mut w3 = watcher(&f, &state);
    assert_eq!(paths(&w3.poll().unwrap()), ["recipes/minimal-demo.yaml"]);

    // run(): a template change is delivered to the callback; the stop flag ends the loop.
    fs::write(
        f.work.join("templates/motd.j2"),
        "{% include \"banner.j2\" %}\nhi\n",
    )
    .unwrap();
    commit_all(&f.repo, "motd", T2 + 50);
    let seen = RefCell::new(Vec::new());
    w3.run(
        Duration::from_millis(20),
        |t| seen.borrow_mut().push(t.recipe_path.clone()),
        || !seen.borrow().is_empty(),
    );
    assert_eq!(
        *seen.borrow(),
        ["recipes/minimal-demo.yaml", "recipes/minimal.yaml"]
    );
    let mut w4 = watcher(&f, &state);
    assert!(w4.poll().unwrap().is_empty(), "run() saved its state");
}

#[test]
fn watcher_state_for_other_ref_does_not_apply_and_bad_state_is_an_error() {
    let f = fixture();
    let state = f.home.join("state.json");
    let mut w = watcher(&f, &state);
    assert_eq!(w.poll().unwrap().len(), 2);
    let mut other = Watcher::with_source(source(&f), "stable", "recipes/*.yaml", &state).unwrap();
    assert_eq!(other.poll().unwrap().len(), 2, "another ref starts fresh");
    fs::write(&state, "{not json").unwrap();
    let e = Watcher::with_source(source(&f), "main", "recipes/*.yaml", &state).unwrap_err();
    assert!(e.to_string().contains("state.json"), "{e}");
    let e = Watcher::with_source(source(&f), "main", "recipes/[.yaml", &state).unwrap_err();
    assert!(e.to_string().contains("glob"), "{e}");
}

/// A one-request-per-connection HTTP server on loopback running `git http-backend` (CGI) for
/// the repositories under `root`. Returns its base URL.
fn serve_git_http(root: PathBuf) -> String {
    use std::io::{BufRead, BufReader, Read, Write};
    let exec_path = std::process::Command::new("git")
        .arg("--exec-path")
        .output()
        .expect("git is installed (Debian package git)");
    let backend =
        PathBuf::from(String::from_utf8(exec_path.stdout).unwrap().trim()).join("git-http-backend");
    assert!(backend.is_file(), "{} missing", backend.display());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let mut parts = line.split_whitespace();
            let method = parts.next().unwrap_or("").to_string();
            let target = parts.next().unwrap_or("").to_string();
            let (path, query) = target.split_once('?').unwrap_or((&target, ""));
            let mut headers = Vec::new();
            loop {
                let mut h = String::new();
                reader.read_line(&mut h).unwrap();
                let h = h.trim_end().to_string();
                if h.is_empty() {
                    break;
                }
                if let Some((k, v)) = h.split_once(':') {
                    headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
                }
            }
            let header = |name: &str| {
                headers
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default()
            };
            let len: usize = header("content-length").parse().unwrap_or(0);
            let mut body = vec![0; len];
            reader.read_exact(&mut body).unwrap();
            // Only kiln's transport (its user agent) is served: proves libgit2's built-in http
            // client is not the one talking.
            if !header("user-agent").contains("kiln") {
                let mut conn = reader.into_inner();
                let _ = conn.write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n");
                continue;
            }
            let mut child = std::process::Command::new(&backend)
                .env_clear()
                .env("GIT_PROJECT_ROOT", &root)
                .env("GIT_HTTP_EXPORT_ALL", "1")
                .env("REQUEST_METHOD", &method)
                .env("PATH_INFO", path)
                .env("QUERY_STRING", query)
                .env("CONTENT_TYPE", header("content-type"))
                .env("CONTENT_LENGTH", len.to_string())
                .env("REMOTE_ADDR", "127.0.0.1")
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            child.stdin.take().unwrap().write_all(&body).unwrap();
            let out = child.wait_with_output().unwrap().stdout;
            let split = out
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .map(|i| (i, 4))
                .or_else(|| out.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2)));
            let (head, rest) = match split {
                Some((i, n)) => (
                    String::from_utf8_lossy(&out[..i]).to_string(),
                    &out[i + n..],
                ),
                None => (String::new(), &out[..]),
            };
            let mut status = "200 OK".to_string();
            let mut response = Vec::new();
            for h in head.lines() {
                match h.strip_prefix("Status:") {
                    Some(s) => status = s.trim().to_string(),
                    None => response.extend_from_slice(format!("{h}\r\n").as_bytes()),
                }
            }
            let mut conn = reader.into_inner();
            let _ = conn.write_all(format!("HTTP/1.1 {status}\r\n").as_bytes());
            let _ = conn.write_all(&response);
            let _ = conn.write_all(
                format!(
                    "Content-Length: {}\r\nConnection: close\r\n\r\n",
                    rest.len()
                )
                .as_bytes(),
            );
            let _ = conn.write_all(rest);
        }
    });
    format!("http://{addr}")
}

#[test]
fn fetch_over_smart_http() {
    let f = fixture();
    let base = serve_git_http(f.work.parent().unwrap().to_path_buf());
    let src = GitMirror::with_home(&format!("{base}/repo"), &f.home).unwrap();
    let c = src.checkout("v1", "recipes/minimal.yaml").unwrap();
    assert!(c.cloned);
    assert_eq!(c.commit, f.c1);
    assert_eq!(c.time, T1);
    assert_eq!(fs::read_to_string(c.dir.join("VERSION")).unwrap(), "1\n");
    // A later commit arrives by fetch (a negotiation with haves) over the same transport.
    fs::write(f.work.join("VERSION"), "3\n").unwrap();
    let c3 = commit_all(&f.repo, "third", T2 + 1);
    let c = src.checkout("main", "VERSION").unwrap();
    assert!(!c.cloned);
    assert_eq!(c.commit, c3);
    assert_eq!(fs::read_to_string(&c.recipe_path).unwrap(), "3\n");
    // A path that is no repository: a clear error naming the URL.
    let e = GitMirror::with_home(&format!("{base}/nothing"), &f.home)
        .unwrap()
        .checkout("main", "x")
        .unwrap_err();
    assert!(matches!(e, SourceError::Unreachable { .. }), "{e:?}");
    assert!(e.to_string().contains("/nothing"), "{e}");
}

/// Commit `tree` on a new branch `name` of the fixture's repository (parent: c2).
fn commit_tree_on_branch(f: &Fixture, name: &str, tree: git2::Oid) {
    let sig = Signature::new("kiln test", "test@example.org", &Time::new(T2 + 10, 0)).unwrap();
    let parent = f
        .repo
        .find_commit(git2::Oid::from_str(&f.c2).unwrap())
        .unwrap();
    let tree = f.repo.find_tree(tree).unwrap();
    let commit = f
        .repo
        .commit(None, &sig, &sig, name, &tree, &[&parent])
        .unwrap();
    f.repo
        .branch(name, &f.repo.find_commit(commit).unwrap(), false)
        .unwrap();
}

#[test]
fn checkouts_past_the_limits_are_refused_before_anything_is_written() {
    let f = fixture();
    let blob = f.repo.blob(b"x\n").unwrap();
    // More entries than a checkout may have (one blob, many names: cheap for git).
    let mut many = f.repo.treebuilder(None).unwrap();
    for i in 0..=kiln::source::MAX_CHECKOUT_FILES {
        many.insert(format!("f{i}"), blob, 0o100644).unwrap();
    }
    let many = many.write().unwrap();
    commit_tree_on_branch(&f, "many", many);
    // Directories nested deeper than allowed.
    let mut deep = {
        let mut t = f.repo.treebuilder(None).unwrap();
        t.insert("leaf", blob, 0o100644).unwrap();
        t.write().unwrap()
    };
    for _ in 0..=kiln::source::MAX_CHECKOUT_DEPTH {
        let mut t = f.repo.treebuilder(None).unwrap();
        t.insert("d", deep, 0o040000).unwrap();
        deep = t.write().unwrap();
    }
    commit_tree_on_branch(&f, "deep", deep);

    let src = source(&f);
    for (branch, want) in [
        (
            "many",
            format!("more than {} files", kiln::source::MAX_CHECKOUT_FILES),
        ),
        (
            "deep",
            format!("nested more than {} deep", kiln::source::MAX_CHECKOUT_DEPTH),
        ),
    ] {
        let started = std::time::Instant::now();
        let err = src.checkout_tree(branch).unwrap_err();
        let msg = err.to_string();
        eprintln!("{branch}: {:.2?}: {msg}", started.elapsed());
        assert!(matches!(err, SourceError::TooLarge { .. }), "{msg}");
        assert!(msg.contains(&want), "{want:?} not in {msg}");
        assert!(msg.contains("Recipe repositories are small"), "{msg}");
        // Nothing was written, nothing is left.
        let left: Vec<_> = fs::read_dir(f.home.join("checkouts")).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
    }
    // The walk that lists files is bounded too.
    let many_commit = src.resolve("many").unwrap().0;
    let err = src.files_at(&many_commit).unwrap_err();
    assert!(matches!(err, SourceError::TooLarge { .. }), "{err}");
}

#[test]
fn credentials_in_the_url_never_reach_messages() {
    let f = fixture();
    let base = serve_git_http(f.work.parent().unwrap().to_path_buf());
    let with_secret = base.replace("http://", "http://kiln:s3cr3t-token@");
    let src = GitMirror::with_home(&format!("{with_secret}/nothing"), &f.home).unwrap();
    let err = src.checkout("main", "x").unwrap_err();
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(matches!(err, SourceError::Unreachable { .. }), "{msg}");
    assert!(msg.contains("/nothing"), "{msg}");
    assert!(msg.contains("***@"), "{msg}");
    assert!(!msg.contains("s3cr3t-token"), "{msg}");
    assert!(!format!("{err:?}").contains("s3cr3t-token"), "{err:?}");
}
