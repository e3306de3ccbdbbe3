//! Agreement with the real tool: Debian's `aide` (0.18) and the agent's integrity code run
//! the same aide.conf over the same tree, before and after a round of changes, and must
//! report the same added, removed and changed paths, and for each changed path the same
//! changed attributes.
//!
//! Without `/usr/bin/aide` this prints `SKIP` and passes, unless `CI` is set (`.ci/run`
//! installs it).

use polaris_agent::integrity::{self, IntegritySettings, Operation};
use polaris_ops_wire::wire::Secret;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::{chown, symlink, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

const AIDE: &str = "/usr/bin/aide";

/// Added paths, removed paths, and changed paths with their changed attribute names.
#[derive(Debug, PartialEq, Eq)]
struct Findings {
    total: u64,
    added: BTreeSet<String>,
    removed: BTreeSet<String>,
    changed: BTreeMap<String, BTreeSet<String>>,
}

fn keys(value: &Value) -> BTreeSet<String> {
    value.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default()
}

fn aide_findings(report: &Value) -> Findings {
    let changed_paths = keys(&report["changed"]);
    let changed = changed_paths.into_iter().map(|p| (p.clone(), keys(&report["details"][&p]))).collect();
    Findings {
        total: report["number_of_entries"]["total"].as_u64().unwrap_or(0),
        added: keys(&report["added"]),
        removed: keys(&report["removed"]),
        changed,
    }
}

fn paths(list: &Value) -> BTreeSet<String> {
    list.as_array().map(|a| a.iter().filter_map(|e| e["path"].as_str().map(String::from)).collect()).unwrap_or_default()
}

fn our_findings(report: &Value) -> Findings {
    let changed = report["changed"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| Some((e["path"].as_str()?.to_string(), keys(&e["attributes"]))))
                .collect::<BTreeMap<_, _>>()
        })
        .unwrap_or_default();
    Findings {
        total: report["summary"]["total"].as_u64().unwrap_or(0),
        added: paths(&report["added"]),
        removed: paths(&report["removed"]),
        changed,
    }
}

struct Bench {
    dir: PathBuf,
    config: PathBuf,
    settings: IntegritySettings,
    secret: Secret,
}

impl Bench {
    fn aide(&self, mode: &str) -> (i32, String) {
        let out = Command::new(AIDE).arg("--config").arg(&self.config).arg(mode).output().expect("aide runs");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let code = out.status.code().unwrap_or(-1);
        assert!(code < 14, "aide {mode} failed ({code}): {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        (code, stdout)
    }

    fn aide_init(&self) {
        self.aide("--init");
        fs::copy(self.dir.join("aide.db.new"), self.dir.join("aide.db")).expect("db in place");
    }

    fn aide_check(&self) -> (i32, Findings) {
        let (code, stdout) = self.aide("--check");
        let report: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("aide json: {e}: {stdout}"));
        (code, aide_findings(&report))
    }

    fn ours(&self, operation: Operation) -> (u32, Findings) {
        let outcome = integrity::run(operation, &self.settings, &self.secret, "agreement-host", 60_000);
        let bits = outcome.status.unwrap_or_else(|code| panic!("{operation:?} failed: {code:?}: {}", outcome.message));
        let report: Value = serde_json::from_str(&outcome.data).expect("our json");
        assert!(report.get("omitted").is_none(), "the test tree fits in one report");
        (bits, our_findings(&report))
    }
}

fn write(path: &Path, text: &str, mode: u32) {
    fs::write(path, text).expect("write");
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
}

fn set_mtime(path: &Path, secs: u64) {
    let file = fs::File::options().write(true).open(path).expect("open");
    file.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(secs)).expect("set mtime");
}

fn build_tree(tree: &Path) {
    for dir in ["", "etc", "bin", "eq", "eq/sub", "logs", "logs/old", "ignored", "var", "grow"] {
        fs::create_dir_all(tree.join(dir)).expect("mkdir");
    }
    write(&tree.join("etc/passwd"), "root:x:0:0::/root:/bin/sh\n", 0o644);
    write(&tree.join("etc/shadow"), "root:*:1::::::\n", 0o640);
    write(&tree.join("etc/hosts"), "127.0.0.1 localhost\n", 0o644);
    write(&tree.join("etc/motd"), "hello\n", 0o644);
    write(&tree.join("etc/issue"), "Debian\n", 0o644);
    write(&tree.join("etc/retyped"), "a file that becomes a directory\n", 0o644);
    write(&tree.join("bin/tool"), &"#!/bin/sh\necho tool\n".repeat(5000), 0o755);
    write(&tree.join("bin/suid"), "setuid binary\n", 0o4755);
    write(&tree.join("bin/doomed"), "to be removed\n", 0o755);
    write(&tree.join("eq/direct"), "directly below an equals rule\n", 0o644);
    write(&tree.join("eq/sub/deep"), "below a subdirectory of an equals rule\n", 0o644);
    write(&tree.join("logs/app.log"), "line 1\n", 0o644);
    write(&tree.join("logs/app.txt"), "not a .log\n", 0o644);
    write(&tree.join("logs/old/app.log"), "old\n", 0o644);
    write(&tree.join("ignored/noise"), "ignored\n", 0o644);
    write(&tree.join("var/data"), "data\n", 0o600);
    write(&tree.join("grow/appended.log"), "first line\n", 0o644);
    write(&tree.join("grow/rewritten.log"), "first line\n", 0o644);
    write(&tree.join("grow/shrunk.log"), "first line\n", 0o644);
    symlink("passwd", tree.join("etc/link")).expect("symlink");
    symlink("/nonexistent/target", tree.join("etc/dangling")).expect("symlink");
    let fifo = Command::new("mkfifo").arg(tree.join("var/fifo")).status().expect("mkfifo");
    assert!(fifo.success());
    let fifo2 = Command::new("mkfifo").arg(tree.join("var/fifo2")).status().expect("mkfifo");
    assert!(fifo2.success());
    // Several owners and groups.
    chown(tree.join("etc/shadow"), Some(0), Some(42)).expect("chown");
    chown(tree.join("var/data"), Some(1), Some(1)).expect("chown");
    chown(tree.join("bin/tool"), Some(2), Some(3)).expect("chown");
    // Past mtimes, so "now" differs from them in the check.
    for file in [
        "etc/passwd",
        "etc/hosts",
        "etc/motd",
        "etc/issue",
        "bin/tool",
        "var/data",
        "grow/appended.log",
        "grow/rewritten.log",
        "grow/shrunk.log",
    ] {
        set_mtime(&tree.join(file), 1_000_000_000);
    }
}

fn change_tree(tree: &Path) {
    // Content (and size).
    fs::write(tree.join("etc/passwd"), "root:x:0:0::/root:/bin/sh\nevil:x:0:0::/:/bin/sh\n").expect("write");
    // Content of the same size.
    fs::write(tree.join("etc/motd"), "HELLO\n").expect("write");
    set_mtime(&tree.join("etc/motd"), 1_000_000_000);
    // Mode.
    fs::set_permissions(tree.join("etc/hosts"), fs::Permissions::from_mode(0o666)).expect("chmod");
    // Owner and group.
    chown(tree.join("var/data"), Some(2), Some(2)).expect("chown");
    // mtime only.
    set_mtime(&tree.join("etc/issue"), 1_200_000_000);
    // A symlink's target.
    fs::remove_file(tree.join("etc/link")).expect("rm");
    symlink("shadow", tree.join("etc/link")).expect("symlink");
    // A file that becomes a directory.
    fs::remove_file(tree.join("etc/retyped")).expect("rm");
    fs::create_dir(tree.join("etc/retyped")).expect("mkdir");
    // Added entries.
    write(&tree.join("bin/backdoor"), "new\n", 0o4755);
    fs::create_dir(tree.join("var/newdir")).expect("mkdir");
    write(&tree.join("var/newdir/file"), "new\n", 0o644);
    symlink("tool", tree.join("bin/newlink")).expect("symlink");
    // Removed entries.
    fs::remove_file(tree.join("bin/doomed")).expect("rm");
    fs::remove_file(tree.join("var/fifo")).expect("rm");
    // Below rules that select differently.
    fs::write(tree.join("eq/direct"), "changed\n").expect("write");
    fs::write(tree.join("eq/sub/deep"), "changed too\n").expect("write");
    fs::write(tree.join("logs/app.log"), "line 1\nline 2\n").expect("write");
    fs::write(tree.join("logs/old/app.log"), "rewritten\n").expect("write");
    fs::write(tree.join("ignored/noise"), "more noise\n").expect("write");
    write(&tree.join("ignored/new"), "x\n", 0o644);
    // Growing files: an append is not a change; a rewrite or a shrink is.
    let mut log = fs::OpenOptions::new().append(true).open(tree.join("grow/appended.log")).expect("open");
    std::io::Write::write_all(&mut log, b"second line\n").expect("append");
    fs::write(tree.join("grow/rewritten.log"), "FIRST LINE\nsecond line\n").expect("write");
    fs::write(tree.join("grow/shrunk.log"), "first\n").expect("write");
}

#[test]
fn aide_and_the_agent_find_the_same_changes() {
    if !Path::new(AIDE).exists() {
        polaris_testkit::skip_unless_ci("/usr/bin/aide is not installed (apt-get install aide)");
        return;
    }
    let tmp = tempfile::Builder::new().prefix("aide-agreement").tempdir().expect("tempdir");
    let dir = fs::canonicalize(tmp.path()).expect("canonical");
    let tree = dir.join("tree");
    build_tree(&tree);
    let config = dir.join("aide.conf");
    let rules = format!(
        "# One rules file for both tools.\n\
         database_in=file:{d}/aide.db\n\
         database_out=file:{d}/aide.db.new\n\
         report_format=json\n\
         report_level=changed_attributes\n\
         report_base16=true\n\
         gzip_dbout=no\n\
         @@define TREE {rel}/tree\n\
         Mine = ftype+p+u+g+s+m+c+i+n+l+sha256\n\
         Light = ftype+p+u+g\n\
         /@@{{TREE}} Mine\n\
         !/@@{{TREE}}/ignored$\n\
         =/@@{{TREE}}/eq/ Light+sha256\n\
         /@@{{TREE}}/logs/.*\\.log$ f Light+s+sha256\n\
         /@@{{TREE}}/logs d Light\n\
         !/@@{{TREE}}/logs/old\n\
         /@@{{TREE}}/var/fifo p Light\n\
         /@@{{TREE}}/grow f p+u+g+s+m+c+sha256+growing\n",
        d = dir.display(),
        // AIDE wants a rule line to start with `/`, so the variable holds the rest.
        rel = dir.display().to_string().trim_start_matches('/'),
    );
    fs::write(&config, rules).expect("rules");
    let bench = Bench {
        dir: dir.clone(),
        config: config.clone(),
        settings: IntegritySettings {
            rules: config.clone(),
            baseline: dir.join("state").join(integrity::BASELINE_FILE),
            report_max_entries: 1000,
            hash_threads: 2,
            pseudo_filesystems: false,
        },
        secret: Secret::new(b"agreement-test-secret-0123".to_vec()).expect("long enough"),
    };

    bench.aide_init();
    let (bits, _) = bench.ours(Operation::Init);
    assert_eq!(bits, 0);

    // Nothing changed yet: both clean, over the same entries.
    let (aide_code, aide_clean) = bench.aide_check();
    let (our_bits, our_clean) = bench.ours(Operation::Check);
    assert_eq!(aide_code, 0, "{aide_clean:?}");
    assert_eq!(our_bits, 0, "{our_clean:?}");
    if our_clean != aide_clean {
        let db = fs::read_to_string(dir.join("aide.db")).unwrap_or_default();
        let aide_paths: BTreeSet<&str> =
            db.lines().filter(|l| l.starts_with('/')).filter_map(|l| l.split(' ').next()).collect();
        let ours = fs::read_to_string(&bench.settings.baseline).unwrap_or_default();
        let ours: Value = ours.split_once('\n').and_then(|(_, j)| serde_json::from_str(j).ok()).unwrap_or_default();
        let ours = keys(&ours["entries"]);
        let only_aide: Vec<&&str> = aide_paths.iter().filter(|p| !ours.contains(**p)).collect();
        let only_ours: Vec<&String> = ours.iter().filter(|p| !aide_paths.contains(p.as_str())).collect();
        panic!("entries differ: only aide's {only_aide:#?}, only ours {only_ours:#?}");
    }
    assert!(our_clean.total > 15, "the rules select the tree: {our_clean:?}");

    change_tree(&tree);
    let (aide_code, aide) = bench.aide_check();
    let (our_bits, ours) = bench.ours(Operation::Check);
    println!("aide: {aide:#?}\nours: {ours:#?}");
    assert_eq!(ours.added, aide.added, "added");
    assert_eq!(ours.removed, aide.removed, "removed");
    assert_eq!(ours.changed, aide.changed, "changed paths and attributes");
    assert_eq!(ours.total, aide.total, "entries scanned");
    assert_eq!(our_bits as i32, aide_code, "exit status bits");

    // The changes made are among those found (the test tree really exercises them).
    let t = |p: &str| format!("{}/{p}", tree.display());
    let attrs = |p: &str| ours.changed.get(&t(p)).cloned().unwrap_or_default();
    assert!(attrs("etc/passwd").contains("sha256") && attrs("etc/passwd").contains("size"));
    assert!(attrs("etc/motd").contains("sha256") && !attrs("etc/motd").contains("size"));
    assert!(attrs("etc/hosts").contains("perm"));
    assert!(attrs("var/data").contains("uid") && attrs("var/data").contains("gid"));
    assert!(attrs("etc/issue").contains("modify_time"));
    assert!(attrs("etc/link").contains("link_name"));
    assert!(attrs("etc/retyped").contains("file_type"));
    assert!(ours.added.contains(&t("bin/backdoor")) && ours.removed.contains(&t("var/fifo")));
    assert!(!ours.changed.contains_key(&t("ignored/noise")));
    assert!(!ours.changed.contains_key(&t("grow/appended.log")), "an append to a growing file");
    assert_eq!(attrs("grow/rewritten.log").into_iter().collect::<Vec<_>>(), ["sha256"]);
    assert!(attrs("grow/shrunk.log").contains("size") && attrs("grow/shrunk.log").contains("sha256"));

    // update accepts it all: both are clean again afterwards.
    let (update_bits, accepted) = bench.ours(Operation::Update);
    assert_eq!(update_bits as i32, aide_code);
    assert_eq!(accepted, ours);
    bench.aide_init();
    let (aide_code, aide_clean) = bench.aide_check();
    let (our_bits, our_clean) = bench.ours(Operation::Check);
    assert_eq!((aide_code, our_bits), (0, 0), "{aide_clean:?} {our_clean:?}");
    assert_eq!(our_clean, aide_clean);
}
