//! Replays the kept fuzz corpus and every fuzz finding through the targets, on the
//! stable toolchain: `fuzz/corpus/<target>/*` (what libFuzzer's coverage kept, minimised)
//! and `fuzz/regressions/<target>/*` (inputs that once crashed a target or broke an
//! invariant). A panic in any of them fails the test, naming the file.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut files: Vec<PathBuf> = entries.map(|e| e.expect("readable fuzz directory").path()).collect();
    files.retain(|p| p.is_file() && !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')));
    files.sort();
    files
}

fn replay(target: &str) {
    let run = polaris_fuzz_targets::TARGETS.iter().find(|(name, _)| *name == target).expect("a known target").1;
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let corpus = files(&fuzz.join("corpus").join(target));
    let regressions = files(&fuzz.join("regressions").join(target));
    assert!(!corpus.is_empty(), "fuzz/corpus/{target} is empty or missing");
    let mut failures = Vec::new();
    for file in corpus.iter().chain(&regressions) {
        let data = std::fs::read(file).expect("readable fuzz input");
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| run(&data))) {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            failures.push(format!("{}: {msg}", file.display()));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} inputs failed:\n{}",
        failures.len(),
        corpus.len() + regressions.len(),
        failures.join("\n")
    );
}

#[test]
fn decoder() {
    replay("decoder");
}

#[test]
fn engine() {
    replay("engine");
}

#[test]
fn dispatch_request() {
    replay("dispatch_request");
}

#[test]
fn envelope() {
    replay("envelope");
}
