//! File integrity: `integrity.init`, `integrity.check` and `integrity.update`, with rules
//! in `aide.conf` syntax taken only from the agent's own configuration.
//!
//! # Layout
//! - [`rules`]: parses aide.conf (groups, macros, includes, options).
//! - [`attrs`]: the attributes a rule can select and their names.
//! - [`select`]: AIDE's selection tree: which rule, if any, selects a path.
//! - [`scan`]: the walk and the hashing thread pool.
//! - [`baseline`]: the signed baseline file in the state directory.
//! - [`report`]: the comparison and its capped JSON report.
//! - this file: the three operations, start to finish.

pub mod attrs;
pub mod baseline;
pub mod report;
pub mod rules;
pub mod scan;
pub mod select;

use polaris_ops_wire::codes::Code;
use polaris_ops_wire::wire::Secret;
use serde_json::json;
use sha2::Digest as _;
use std::path::PathBuf;

/// The file name of the baseline in the state directory.
pub const BASELINE_FILE: &str = "integrity.baseline";

/// Entries listed in a report when the config does not say.
pub const DEFAULT_REPORT_MAX_ENTRIES: usize = 1000;

/// Which operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Build the baseline.
    Init,
    /// Compare with the baseline.
    Check,
    /// Compare, then accept what was found.
    Update,
}

impl Operation {
    fn method(self) -> &'static str {
        match self {
            Operation::Init => "integrity.init",
            Operation::Check => "integrity.check",
            Operation::Update => "integrity.update",
        }
    }
}

/// What the operations need from the agent's configuration.
#[derive(Debug, Clone)]
pub struct IntegritySettings {
    /// The rules file (aide.conf syntax).
    pub rules: PathBuf,
    /// Where the baseline is kept.
    pub baseline: PathBuf,
    /// Entries listed in a report at most.
    pub report_max_entries: usize,
    /// Hashing threads; 0 takes the rules' `num_workers`, else every core.
    pub hash_threads: usize,
    /// Whether to walk into kernel pseudo-filesystems.
    pub pseudo_filesystems: bool,
}

/// How an operation ended: `Ok` with a success retcode (AIDE's bits: 1 added, 2 removed,
/// 4 changed), or a failure code; both with a message and the JSON report (or nothing).
#[derive(Debug)]
pub struct Outcome {
    /// `Ok(retcode)` or `Err(code)`.
    pub status: Result<u32, Code>,
    /// One line for people.
    pub message: String,
    /// The JSON report (empty on failure).
    pub data: String,
}

fn failed(code: Code, message: String) -> Outcome {
    Outcome { status: Err(code), message, data: String::new() }
}

/// Runs `operation` for `host` with `settings`; the report, escaped, fits `max_bytes`.
pub fn run(
    operation: Operation,
    settings: &IntegritySettings,
    secret: &Secret,
    host: &str,
    max_bytes: usize,
) -> Outcome {
    let text = match std::fs::read_to_string(&settings.rules) {
        Ok(text) => text,
        Err(e) => {
            return failed(Code::RulesInvalid, format!("cannot read rules file {}: {e}", settings.rules.display()))
        }
    };
    let rules_sha256 = hex::encode(sha2::Sha256::digest(text.as_bytes()));
    let shown = settings.rules.display().to_string();
    let rules = match rules::parse(&text, &shown, settings.rules.parent()) {
        Ok(rules) => rules,
        Err(e) => return failed(Code::RulesInvalid, format!("Rules invalid: {e}")),
    };
    if rules.rules.is_empty() {
        return failed(Code::RulesInvalid, format!("Rules invalid: {shown} selects nothing (no rule lines)"));
    }
    let mut selection = match select::Selection::new(&rules.rules) {
        Ok(s) => s,
        Err(e) => return failed(Code::RulesInvalid, format!("Rules invalid: {e}")),
    };
    let old = match operation {
        Operation::Init => None,
        Operation::Check | Operation::Update => match baseline::read(&settings.baseline, secret, host) {
            Ok(b) => Some(b),
            Err(e @ baseline::BaselineError::Missing(_)) => {
                return failed(Code::BaselineMissing, format!("{e}; run integrity.init first"))
            }
            Err(e @ baseline::BaselineError::Tampered { .. }) => {
                log::error!("integrity: {e}");
                return failed(
                    Code::BaselineTampered,
                    format!("{e}; nothing it says is trusted: investigate, then integrity.init on a known-good host"),
                );
            }
            Err(e) => return failed(Code::IntegrityFailed, e.to_string()),
        },
    };
    let threads = match settings.hash_threads {
        0 => rules.num_workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        n => n,
    };
    let growing = old
        .iter()
        .flat_map(|b| &b.entries)
        .filter(|(_, e)| e.attrs.contains(attrs::Attrs::GROWING) && e.attrs.intersects(attrs::Attrs::HASHES))
        .filter_map(|(path, e)| Some((path.clone(), e.size?)))
        .collect();
    let options = scan::ScanOptions { threads, pseudo_filesystems: settings.pseudo_filesystems, growing };
    let found = scan::scan(&mut selection, &options);
    let mut warnings: Vec<String> = rules.notes.clone();
    warnings.extend(found.skipped_pseudo.iter().map(|p| format!("{p}: a kernel pseudo-filesystem, not walked into")));
    warnings.extend(found.warnings.iter().cloned());
    let total = found.entries.len();
    if old.as_ref().is_some_and(|b| b.rules_sha256 != rules_sha256) {
        warnings.insert(
            0,
            format!(
                "{shown} changed since the baseline was made: entries it selects differently show as added or removed"
            ),
        );
    }
    if total == 0 {
        warnings.insert(0, format!("the rules of {shown} select no entry on this host"));
    }
    let empty = std::collections::BTreeMap::new();
    let old_entries = old.as_ref().map_or(&empty, |b| &b.entries);
    let diff = match operation {
        Operation::Init => report::Diff::default(),
        _ => report::diff(old_entries, &found.entries, rules.ignore_changed, &found.prefix_hashes),
    };
    let mut baseline_facts = match &old {
        Some(b) => json!({
            "created_at": b.created_at,
            "entries": b.entries.len(),
            "rules_changed": b.rules_sha256 != rules_sha256,
        }),
        None => json!({}),
    };
    if operation != Operation::Check {
        let new = baseline::Baseline::new(host, rules_sha256, found.entries);
        if let Err(e) = baseline::write(&settings.baseline, secret, &new) {
            return failed(Code::IntegrityFailed, format!("cannot write the baseline: {e}"));
        }
        baseline_facts["written"] = json!({"created_at": new.created_at, "entries": new.entries.len()});
    }
    let head = report::ReportHead { method: operation.method(), total, baseline: baseline_facts, warnings };
    let data = report::render(&head, &diff, settings.report_max_entries, max_bytes);
    let bits = diff.status_bits();
    let counts = format!("{} added, {} removed, {} changed", diff.added.len(), diff.removed.len(), diff.changed.len());
    let message = match operation {
        Operation::Init => format!("Baseline written: {total} entries"),
        Operation::Check if bits == 0 => format!("No differences: {total} entries match the baseline"),
        Operation::Check => format!("Differences found: {counts} of {total} entries"),
        Operation::Update => format!("Baseline updated: {counts} accepted; {total} entries"),
    };
    Outcome { status: Ok(bits), message, data }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn setup(rules: &str) -> (tempfile::TempDir, IntegritySettings, Secret) {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = std::fs::canonicalize(dir.path()).expect("canonical");
        std::fs::create_dir(root.join("tree")).expect("mkdir");
        let rules_path = root.join("aide.conf");
        std::fs::write(&rules_path, rules.replace("TREE", &root.join("tree").display().to_string())).expect("rules");
        let settings = IntegritySettings {
            rules: rules_path,
            baseline: root.join("state").join(BASELINE_FILE),
            report_max_entries: 10,
            hash_threads: 2,
            pseudo_filesystems: false,
        };
        (dir, settings, Secret::new(b"unit-test-secret-0123456".to_vec()).expect("long enough"))
    }

    fn tree(settings: &IntegritySettings) -> PathBuf {
        settings.rules.with_file_name("tree")
    }

    #[test]
    fn missing_tampered_and_invalid_have_their_codes() {
        let (_dir, settings, secret) = setup("TREE p+sha256\n");
        std::fs::write(tree(&settings).join("f"), "x").expect("write");
        assert_eq!(run(Operation::Check, &settings, &secret, "h", 60_000).status.err(), Some(Code::BaselineMissing));
        assert_eq!(run(Operation::Init, &settings, &secret, "h", 60_000).status.ok(), Some(0));
        assert_eq!(run(Operation::Check, &settings, &secret, "h", 60_000).status.ok(), Some(0));
        // Another host (same secret) may not use this baseline.
        assert_eq!(run(Operation::Check, &settings, &secret, "h2", 60_000).status.err(), Some(Code::BaselineTampered));
        let text = std::fs::read(&settings.baseline).expect("baseline");
        let mut edited = text.clone();
        let last = edited.len() - 2;
        edited[last] ^= 1;
        std::fs::write(&settings.baseline, edited).expect("edit");
        let outcome = run(Operation::Check, &settings, &secret, "h", 60_000);
        assert_eq!(outcome.status.err(), Some(Code::BaselineTampered), "{}", outcome.message);
        // Update refuses to build on a tampered baseline too.
        assert_eq!(run(Operation::Update, &settings, &secret, "h", 60_000).status.err(), Some(Code::BaselineTampered));
        std::fs::write(&settings.rules, "TREE p+nonsense\n").expect("rules");
        let outcome = run(Operation::Check, &settings, &secret, "h", 60_000);
        assert_eq!(outcome.status.err(), Some(Code::RulesInvalid));
        assert!(outcome.message.contains("aide.conf:1"), "{}", outcome.message);
    }

    #[test]
    fn a_rules_change_since_the_baseline_is_said() {
        let (_dir, settings, secret) = setup("TREE p\n");
        run(Operation::Init, &settings, &secret, "h", 60_000).status.expect("init");
        let unchanged = run(Operation::Check, &settings, &secret, "h", 60_000);
        assert!(!unchanged.data.contains("changed since the baseline"), "{}", unchanged.data);
        let text = std::fs::read_to_string(&settings.rules).expect("rules");
        std::fs::write(&settings.rules, format!("# edited\n{text}")).expect("rules");
        let report: serde_json::Value =
            serde_json::from_str(&run(Operation::Check, &settings, &secret, "h", 60_000).data).expect("json");
        assert_eq!(report["baseline"]["rules_changed"], true);
        assert!(report["warnings"][0].as_str().is_some_and(|w| w.contains("changed since the baseline")), "{report}");
    }

    #[test]
    fn growing_files_may_be_appended_to_not_rewritten() {
        let (_dir, settings, secret) = setup("TREE f p+s+sha256+growing\n");
        let log = tree(&settings).join("app.log");
        std::fs::write(&log, "one\n").expect("write");
        run(Operation::Init, &settings, &secret, "h", 60_000).status.expect("init");
        std::fs::write(&log, "one\ntwo\n").expect("append");
        assert_eq!(run(Operation::Check, &settings, &secret, "h", 60_000).status.ok(), Some(0));
        std::fs::write(&log, "ONE\ntwo\n").expect("rewrite");
        let outcome = run(Operation::Check, &settings, &secret, "h", 60_000);
        assert_eq!(outcome.status.ok(), Some(4), "{}", outcome.message);
        assert!(outcome.data.contains("\"sha256\""), "{}", outcome.data);
        std::fs::write(&log, "on").expect("shrink");
        let outcome = run(Operation::Check, &settings, &secret, "h", 60_000);
        assert!(outcome.data.contains("\"size\""), "{}", outcome.data);
    }

    #[test]
    fn reports_are_capped_with_a_marker() {
        // Files only (the directory is walked, not recorded), so only additions show.
        let (_dir, settings, secret) = setup("TREE f p+s+sha256\n");
        run(Operation::Init, &settings, &secret, "h", 60_000).status.expect("init");
        for i in 0..40 {
            std::fs::write(tree(&settings).join(format!("new{i:02}")), "x").expect("write");
        }
        let outcome = run(Operation::Check, &settings, &secret, "h", 60_000);
        assert_eq!(outcome.status.ok(), Some(1), "{}", outcome.message);
        let report: Value = serde_json::from_str(&outcome.data).expect("json");
        assert_eq!(report["summary"]["added"], 40);
        assert_eq!(report["added"].as_array().map(Vec::len), Some(10));
        assert_eq!(report["omitted"]["added"], 30);
        assert_eq!(report["omitted"]["more"], "30 more entries not listed");
        // Update accepts all 40 (and says so), then the tree is clean.
        let update = run(Operation::Update, &settings, &secret, "h", 60_000);
        assert!(update.message.contains("40 added"), "{}", update.message);
        assert_eq!(run(Operation::Check, &settings, &secret, "h", 60_000).status.ok(), Some(0));
    }
}
