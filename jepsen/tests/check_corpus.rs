//! The checkers agree with every verdict that Porcupine's test suite
//! asserts on its public test data (Jepsen etcd logs, 6.824 KV histories).
//!
//! The corpus is found, in this order, at `$LATCHKEY_PORCUPINE_CORPUS`,
//! at `../../shared/corpus/porcupine` from this crate, and at
//! `/work/shared/corpus/porcupine`. A missing corpus fails the test: a
//! checker test that checks nothing must not pass.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use latchkey_jepsen::check::formats::{self, Format};
use latchkey_jepsen::check::{check_history, CheckOptions, Validity};

const CORPUS_ENV: &str = "LATCHKEY_PORCUPINE_CORPUS";
const FALLBACK_CORPUS: &str = "/work/shared/corpus/porcupine";
/// Generous: the test runs unoptimised, on a shared machine.
const BUDGET_PER_FILE: Duration = Duration::from_secs(120);

fn corpus_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(CORPUS_ENV) {
        let dir = PathBuf::from(dir);
        assert!(
            dir.join("EXPECTED.tsv").is_file(),
            "{CORPUS_ENV}={} has no EXPECTED.tsv",
            dir.display()
        );
        return dir;
    }
    let beside = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/corpus/porcupine");
    let candidates = [beside, PathBuf::from(FALLBACK_CORPUS)];
    candidates
        .iter()
        .find(|dir| dir.join("EXPECTED.tsv").is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "Porcupine corpus not found: set {CORPUS_ENV} to the directory holding \
                 EXPECTED.tsv (tried {candidates:?})"
            )
        })
}

/// `(file, expected)` rows; `expected` is `Some(true)` for linearizable,
/// `Some(false)` for not, `None` for unasserted.
fn expectations(dir: &Path) -> Vec<(String, Option<bool>)> {
    let text = std::fs::read_to_string(dir.join("EXPECTED.tsv")).expect("read EXPECTED.tsv");
    let mut rows = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
    {
        let (file, verdict) = line.split_once('\t').expect("file<TAB>verdict");
        let expected = match verdict.trim() {
            "linearizable" => Some(true),
            "not-linearizable" => Some(false),
            "unasserted" => None,
            other => panic!("unknown verdict {other:?} for {file}"),
        };
        rows.push((file.to_string(), expected));
    }
    rows
}

#[test]
fn checker_agrees_with_every_verdict_porcupine_asserts() {
    let dir = corpus_dir();
    let rows = expectations(&dir);
    assert!(
        rows.len() >= 100,
        "EXPECTED.tsv lists only {} files",
        rows.len()
    );
    let options = CheckOptions {
        budget: BUDGET_PER_FILE,
        ..CheckOptions::default()
    };
    let mut disagreements = Vec::new();
    let mut undecided = Vec::new();
    let started = Instant::now();
    for (file, expected) in &rows {
        let ops = formats::read_history(&dir.join(file), Format::Auto).expect("readable");
        let begun = Instant::now();
        let results = check_history(&ops, &options);
        let took = begun.elapsed();
        let ours = match results.valid {
            Validity::Valid => Some(true),
            Validity::Invalid => Some(false),
            Validity::Unknown => None,
        };
        eprintln!("{file}\t{expected:?}\t{ours:?}\t{:.3}s", took.as_secs_f64());
        match (expected, ours) {
            (Some(expected), Some(ours)) if *expected != ours => disagreements.push(file.clone()),
            (Some(_), None) => undecided.push(file.clone()),
            _ => {}
        }
    }
    eprintln!(
        "{} files in {:.1}s; undecided within the budget: {undecided:?}",
        rows.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        disagreements.is_empty(),
        "verdicts disagree with Porcupine's: {disagreements:?}"
    );
}
