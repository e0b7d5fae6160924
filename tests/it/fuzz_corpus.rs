//! The fuzz corpus (`tests/fuzz/corpus/<target>/`) replayed on stable through the very code the fuzz targets
//! run (`tests/fuzz/src/lib.rs`, included here): every committed input, including each crash the fuzzers
//! found, must pass without a panic.

#[path = "../fuzz/src/lib.rs"]
mod cases;

use crate::support::TempDir;
use std::path::{Path, PathBuf};

fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(
        files.len() >= 10,
        "{}: only {} inputs",
        dir.display(),
        files.len()
    );
    files
}

/// Runs `f` on every input of `target`; fails naming each input that panicked.
fn replay(target: &str, f: impl Fn(&[u8])) {
    let mut failed = Vec::new();
    for file in corpus(target) {
        let data = std::fs::read(&file).unwrap();
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&data))).is_err() {
            failed.push(file.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "{target}: these inputs panic: {failed:#?}"
    );
}

#[test]
fn snapshot_corpus_replays_without_a_panic() {
    replay("snapshot", cases::snapshot);
}

#[test]
fn params_corpus_replays_without_a_panic() {
    let dir = TempDir::new("fuzz-params");
    let fx = cases::Fixture::new(dir.path("db"));
    replay("params", |data| cases::params(&fx, data));
}
