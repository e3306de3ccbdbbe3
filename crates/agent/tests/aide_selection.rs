//! AIDE's selection rules, case by case: for each rule set, Debian's `aide --init` and the
//! agent's `integrity.init` must select exactly the same entries of one tree, and hash the
//! same ones. Together with `aide_agreement.rs` this holds the port of AIDE's selection
//! tree (`integrity/select.rs`) to the real thing: `!`, `=`, regexes, restrictions and
//! the precedence between nodes.
//!
//! Without `/usr/bin/aide` this prints `SKIP` and passes, unless `CI` is set.

use polaris_agent::integrity::{self, IntegritySettings, Operation};
use polaris_ops_wire::wire::Secret;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::Command;

const AIDE: &str = "/usr/bin/aide";

/// Selected paths (relative to the tree, `.` for the tree itself), each with whether its
/// content was hashed.
type Selected = BTreeMap<String, bool>;

fn build_tree(tree: &Path) {
    for dir in ["a/sub", "a/skip", "b/deep/er", "c/x", "logs", "n10", "n2x"] {
        fs::create_dir_all(tree.join(dir)).expect("mkdir");
    }
    for file in [
        "top",
        "topmost",
        "a/one",
        "a/two.tmp",
        "a/sub/three",
        "a/sub/four.tmp",
        "a/skip/five",
        "a/123",
        "a/12x",
        "b/six",
        "b/deep/seven",
        "b/deep/er/eight",
        "c/nine",
        "c/x/ten",
        "logs/app.log",
        "logs/app.log.1",
        "logs/other.txt",
        "n10/f",
        "n2x/f",
    ] {
        fs::write(tree.join(file), file).expect("write");
    }
    symlink("one", tree.join("a/link")).expect("symlink");
    symlink("six", tree.join("b/link")).expect("symlink");
    symlink("deep", tree.join("c/dirlink")).expect("symlink");
}

fn relative(tree: &Path, path: &str) -> String {
    let t = tree.display().to_string();
    match path.strip_prefix(&t) {
        Some("") => ".".into(),
        Some(rest) => rest.trim_start_matches('/').to_string(),
        None => format!("OUTSIDE {path}"),
    }
}

fn aide_selected(dir: &Path, tree: &Path, rules: &str) -> Selected {
    let config = dir.join("aide.conf");
    fs::write(&config, format!("database_out=file:{}/aide.db.new\n{rules}", dir.display())).expect("config");
    let _ = fs::remove_file(dir.join("aide.db.new"));
    let out = Command::new(AIDE).arg("--config").arg(&config).arg("--init").output().expect("aide");
    assert_eq!(out.status.code(), Some(0), "aide --init: {}", String::from_utf8_lossy(&out.stderr));
    let db = fs::read_to_string(dir.join("aide.db.new")).expect("aide db");
    let spec: Vec<&str> = db
        .lines()
        .find_map(|l| l.strip_prefix("@@db_spec "))
        .map(|s| s.split_whitespace().collect())
        .unwrap_or_default();
    let sha = spec.iter().position(|c| *c == "sha256");
    db.lines()
        .filter(|l| l.starts_with('/'))
        .map(|l| {
            let fields: Vec<&str> = l.split(' ').collect();
            let hashed = sha.and_then(|i| fields.get(i)).is_some_and(|v| *v != "0");
            (relative(tree, fields[0]), hashed)
        })
        .collect()
}

fn our_selected(dir: &Path, tree: &Path, rules: &str) -> Selected {
    let config = dir.join("ours.conf");
    fs::write(&config, rules).expect("rules");
    let settings = IntegritySettings {
        rules: config,
        baseline: dir.join("state").join(integrity::BASELINE_FILE),
        report_max_entries: 1000,
        hash_threads: 2,
        pseudo_filesystems: false,
    };
    let secret = Secret::new(b"selection-test-secret-0123".to_vec()).expect("long enough");
    let outcome = integrity::run(Operation::Init, &settings, &secret, "h", 60_000);
    assert_eq!(outcome.status, Ok(0), "{}", outcome.message);
    let text = fs::read_to_string(&settings.baseline).expect("baseline");
    let baseline: Value = text.split_once('\n').and_then(|(_, json)| serde_json::from_str(json).ok()).expect("json");
    baseline["entries"]
        .as_object()
        .expect("entries")
        .iter()
        .map(|(path, entry)| (relative(tree, path), entry.get("sha256").is_some()))
        .collect()
}

#[test]
fn aide_and_the_agent_select_the_same_entries() {
    if !Path::new(AIDE).exists() {
        polaris_testkit::skip_unless_ci("/usr/bin/aide is not installed (apt-get install aide)");
        return;
    }
    let tmp = tempfile::Builder::new().prefix("aide-selection").tempdir().expect("tempdir");
    let dir = fs::canonicalize(tmp.path()).expect("canonical");
    let tree = dir.join("tree");
    build_tree(&tree);
    let t = tree.display().to_string();
    let cases: Vec<(&str, String)> = vec![
        ("everything", format!("{t} p+sha256\n")),
        ("negative regexes and their subtrees", format!("{t} p\n!{t}/a/.*\\.tmp$\n!{t}/a/skip\n{t}/b/deep p+sha256\n")),
        ("anchored negative keeps the siblings", format!("{t} p\n!{t}/top$\n!{t}/b$\n{t}/b/deep p+sha256\n")),
        ("equals with and without a slash", format!("={t}/a/ p+sha256\n={t}/b p\n")),
        ("equals beside selective", format!("={t}/ p\n{t}/b/deep p+sha256\n!{t}/c\n")),
        ("restrictions", format!("{t} f p+sha256\n{t} d p\n!{t}/b l\n")),
        ("restricted negative", format!("{t} p+sha256\n!{t}/a f\n")),
        ("alternation and classes", format!("{t}/(a|c)/[a-z]+$ p+sha256\n{t}/n[0-9]+/ p\n")),
        (
            "deeper nodes win, first match inside a node",
            format!("{t} p\n{t}/a/sub p+sha256\n{t}/a/.* p\n{t}/a/sub/four p\n"),
        ),
        ("logs", format!("{t}/logs/.*\\.log$ f p+sha256\n{t}/logs d p\n")),
        ("symlinks are not followed", format!("{t}/c p+sha256\n")),
    ];
    let mut failures = Vec::new();
    for (name, rules) in &cases {
        let aide = aide_selected(&dir, &tree, rules);
        let ours = our_selected(&dir, &tree, rules);
        assert!(!aide.is_empty(), "{name}: the rules select something");
        if aide != ours {
            failures.push(format!("{name}:\n{rules}aide: {aide:?}\nours: {ours:?}"));
        }
    }
    assert!(failures.is_empty(), "selection differs from aide's:\n{}", failures.join("\n\n"));
}
