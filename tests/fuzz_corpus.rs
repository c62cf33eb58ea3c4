//! Replays the fuzzing corpus and every crash the fuzzers found (`fuzz/corpus/<target>/`,
//! `fuzz/regressions/<target>/`) through the harnesses in `kiln::fuzz`, the same functions the
//! cargo-fuzz targets call. No input may panic. A target without corpus files fails the test,
//! so it cannot pass by finding nothing to run.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

mod common;

fn fuzz_dir() -> PathBuf {
    common::root().join("fuzz")
}

/// The files of `dir`, sorted; none when it does not exist.
fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(read) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = read
        .map(|e| e.unwrap_or_else(|e| panic!("listing {}: {e}", dir.display())))
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    out.sort();
    out
}

/// The names of the subdirectories (or, with `ext`, of the files ending in `.ext`) of `dir`.
fn names(dir: &Path, ext: Option<&str>) -> Vec<String> {
    let Ok(read) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<String> = read
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter_map(|p| match ext {
            None => p
                .is_dir()
                .then(|| p.file_name()?.to_str().map(str::to_string))?,
            Some(ext) => p
                .extension()
                .is_some_and(|e| e == ext)
                .then(|| p.file_stem()?.to_str().map(str::to_string))?,
        })
        .collect();
    out.sort();
    out
}

#[test]
fn every_fuzz_target_has_a_harness_and_a_corpus() {
    let mut known: Vec<String> = kiln::fuzz::TARGETS
        .iter()
        .map(|(n, _)| n.to_string())
        .collect();
    known.sort();
    let dir = fuzz_dir();
    assert_eq!(
        names(&dir.join("fuzz_targets"), Some("rs")),
        known,
        "fuzz/fuzz_targets/*.rs and kiln::fuzz::TARGETS must name the same targets"
    );
    for sub in ["corpus", "regressions"] {
        for name in names(&dir.join(sub), None) {
            assert!(
                known.contains(&name),
                "fuzz/{sub}/{name} belongs to no target of kiln::fuzz::TARGETS"
            );
        }
    }
}

#[test]
fn corpus_and_regressions_do_not_panic() {
    // The harnesses' panics are caught and reported below, one line per input.
    std::panic::set_hook(Box::new(|_| {}));
    let dir = fuzz_dir();
    let mut failures = Vec::new();
    let mut empty = Vec::new();
    let mut total = 0;
    for (name, harness) in kiln::fuzz::TARGETS {
        let corpus = files(&dir.join("corpus").join(name));
        if corpus.is_empty() {
            empty.push(format!("fuzz/corpus/{name}"));
        }
        let regressions = files(&dir.join("regressions").join(name));
        for path in corpus.iter().chain(&regressions) {
            let data =
                std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
            total += 1;
            if let Err(panic) = catch_unwind(AssertUnwindSafe(|| harness(&data))) {
                let message = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("(no message)");
                failures.push(format!("{name}: {}: {message}", path.display()));
            }
        }
    }
    let _ = std::panic::take_hook();
    assert!(
        empty.is_empty(),
        "no inputs in {}: every target needs a seed corpus",
        empty.join(", ")
    );
    assert!(
        failures.is_empty(),
        "{} of {total} fuzz inputs panicked:\n{}",
        failures.len(),
        failures.join("\n")
    );
    println!("{total} fuzz inputs replayed without a panic");
}
