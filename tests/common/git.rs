//! Git repositories made with git2 for tests.

use git2::{Repository, Signature, Time};

/// Commit everything in the work tree (new, changed and deleted files) on HEAD, authored and
/// committed by "kiln test" at `time` (seconds since the epoch); the new commit's id.
pub fn commit_all(repo: &Repository, message: &str, time: i64) -> String {
    let mut index = repo.index().unwrap();
    index
        .add_all(["*"], git2::IndexAddOption::DEFAULT, None)
        .unwrap();
    index.update_all(["*"], None).unwrap();
    index.write().unwrap();
    let tree_id = index.write_tree().unwrap();
    let tree = repo.find_tree(tree_id).unwrap();
    let sig = Signature::new("kiln test", "test@example.org", &Time::new(time, 0)).unwrap();
    let parent = repo.head().ok().and_then(|h| h.peel_to_commit().ok());
    let parents: Vec<&git2::Commit> = parent.iter().collect();
    repo.commit(Some("HEAD"), &sig, &sig, message, &tree, &parents)
        .unwrap()
        .to_string()
}
