//! The agent-side standing tasks end to end, through a real queue, dispatcher and agent
//! on loopback: a `log` task follows a file across a rename (logrotate's `create`), a
//! truncation (`copytruncate`) and an agent restart, and the dispatcher holds every line
//! once and in order; paths outside the log roots (one a symlink leading out) are refused
//! and never read. A continuous-integrity task reports a change once, and nothing while
//! nothing changes.

use polaris_testkit::cluster::{get, post, request, Cluster, TEST_SECRET};
use polaris_testkit::process::{binary, wait_until, Proc};
use serde_json::{json, Value};
use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const HOST: &str = "watch-01";

fn start_agent(cluster: &Cluster, config: &Path, state_file: &Path) -> Proc {
    let child = Command::new(binary("polaris-agent"))
        .args(["--queue", &cluster.queue.addr, "--host-id", HOST, "--dispatch", &cluster.dispatch.url])
        .arg("--state-file")
        .arg(state_file)
        .arg("--config")
        .arg(config)
        .args(["--tasks-poll", "1", "--kill-grace-ms", "500", "--drain-timeout", "5"])
        .env("POLARIS_SECRET", TEST_SECRET)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start polaris-agent");
    Proc::new("agent", child)
}

fn append(path: &Path, lines: std::ops::RangeInclusive<u32>) {
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).expect("open for append");
    for i in lines {
        writeln!(f, "line {i} of the application log").expect("write");
    }
}

fn lines_of(cluster: &Cluster, path: &Path) -> Vec<Value> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let url = cluster.url(&format!("/v1/hosts/{HOST}/logs?path={}&after={after}&limit=500", path.display()));
        let (status, body) = get(&url);
        assert_eq!(status, 200, "{body}");
        let page = body["lines"].as_array().cloned().unwrap_or_default();
        if page.is_empty() {
            return out;
        }
        after = body["next_after"].as_i64().expect("next_after");
        out.extend(page);
    }
}

fn texts(lines: &[Value]) -> Vec<String> {
    lines.iter().map(|l| l["line"].as_str().unwrap_or("").to_string()).collect()
}

fn expected(n: u32) -> Vec<String> {
    (1..=n).map(|i| format!("line {i} of the application log")).collect()
}

/// Waits until the dispatcher has `n` lines of `path`, then checks they are exactly
/// lines 1..=n, in order, each once.
fn has_exactly(cluster: &Cluster, path: &Path, n: u32) {
    wait_until(Duration::from_secs(30), &format!("the dispatcher has {n} lines"), || {
        lines_of(cluster, path).len() >= n as usize
    });
    let lines = lines_of(cluster, path);
    assert_eq!(texts(&lines), expected(n));
    for pair in lines.windows(2) {
        assert!(pair[0]["seq"].as_i64() < pair[1]["seq"].as_i64(), "{pair:?}");
    }
}

fn put_task(cluster: &Cluster, name: &str, body: Value) {
    let (status, reply) = request("PUT", &cluster.url(&format!("/v1/tasks/{name}")), Some(&body.to_string()), None);
    assert!(status == 200 || status == 201, "{status}: {reply}");
}

#[test]
fn standing_log_and_integrity_tasks() {
    let cluster = Cluster::start(&[]);
    let root = std::fs::canonicalize(cluster.dir.path()).expect("canonical").join("host");
    let logs = root.join("logs");
    let tree = root.join("tree");
    std::fs::create_dir_all(&logs).expect("mkdir");
    std::fs::create_dir_all(&tree).expect("mkdir");
    std::fs::write(tree.join("hosts"), "127.0.0.1 localhost\n").expect("write");
    std::fs::write(tree.join("passwd"), "root:x:0:0\n").expect("write");
    let outside = root.join("secret.log");
    std::fs::write(&outside, "never to be read\n").expect("write");
    let sneaky = logs.join("sneaky.log");
    std::os::unix::fs::symlink(&outside, &sneaky).expect("symlink");
    let rules = root.join("aide.conf");
    std::fs::write(&rules, format!("{} f p+s+sha256\n", tree.display())).expect("rules");
    let config = root.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{}\"\n[integrity]\nrules = \"{}\"\n[log]\nroots = [\"{}\"]\n",
            root.join("state").display(),
            rules.display(),
            logs.display()
        ),
    )
    .expect("config");
    let state_file = root.join("agent.json");
    let mut agent = start_agent(&cluster, &config, &state_file);
    wait_until(Duration::from_secs(15), "the agent registered", || {
        let (status, body) = get(&cluster.url("/v1/hosts"));
        status == 200 && body["hosts"].as_array().is_some_and(|list| list.iter().any(|h| h["id"] == HOST))
    });

    // ---- log watch
    let app = logs.join("app.log");
    append(&app, 1..=5);
    let paths = json!([app.display().to_string(), outside.display().to_string(), sneaky.display().to_string()]);
    put_task(
        &cluster,
        "applog",
        json!({"attach_to": {"host": HOST}, "kind": "log", "spec": {"paths": paths, "every": 1}}),
    );
    has_exactly(&cluster, &app, 5);

    // Refused, once, and never read.
    for refused in [&outside, &sneaky] {
        let url = cluster.url(&format!("/v1/hosts/{HOST}/logs?path={}", refused.display()));
        wait_until(Duration::from_secs(15), "the refusal is reported", || get(&url).1["refused"].is_object());
        let (_, body) = get(&url);
        assert_eq!(body["refused"]["code"], "path_not_allowed", "{body}");
        assert_eq!(body["lines"], json!([]), "{body}");
    }

    // logrotate's create: the old file is renamed (and still written by its writer for a
    // moment), a new one takes its name.
    let rotated = logs.join("app.log.1");
    std::fs::rename(&app, &rotated).expect("rename");
    append(&rotated, 6..=7);
    append(&app, 8..=10);
    has_exactly(&cluster, &app, 10);

    // copytruncate: the file is cut to nothing in place and written again.
    std::fs::OpenOptions::new().write(true).open(&app).expect("open").set_len(0).expect("truncate");
    append(&app, 11..=12);
    has_exactly(&cluster, &app, 12);

    // A restart loses nothing and repeats nothing: lines written while the agent is down,
    // and a rotation it missed.
    agent.signal("TERM").expect("SIGTERM");
    assert_eq!(agent.wait_exit(Duration::from_secs(20)), Some(true), "{}", agent.output_tail(4000));
    append(&app, 13..=14);
    std::fs::rename(&app, logs.join("app.log.2")).expect("rename");
    append(&logs.join("app.log.2"), 15..=15);
    append(&app, 16..=17);
    let mut agent = start_agent(&cluster, &config, &state_file);
    has_exactly(&cluster, &app, 17);
    let log_text = agent.output();
    assert!(!log_text.contains("never to be read"), "{log_text}");

    // ---- continuous integrity
    let (status, reply) =
        post(&cluster.url("/v1/jobs"), &json!({"method": "integrity.init", "hosts": [HOST], "timeout": 60}));
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["response"][0]["resp"], "success", "{reply}");
    put_task(&cluster, "tree", json!({"attach_to": {"host": HOST}, "kind": "integrity", "spec": {"every": 2}}));
    let reports = || {
        let (status, body) = get(&cluster.url(&format!("/v1/hosts/{HOST}/integrity?task=tree")));
        assert_eq!(status, 200, "{body}");
        body["reports"].as_array().cloned().unwrap_or_default()
    };
    std::fs::write(tree.join("hosts"), "127.0.0.1 localhost\n10.0.0.1 intruder\n").expect("change");
    wait_until(Duration::from_secs(30), "a report of the change", || !reports().is_empty());
    let first = reports();
    assert_eq!(first.len(), 1, "{first:?}");
    let report = &first[0]["report"];
    let changed = report["changed"].as_array().cloned().unwrap_or_default();
    assert_eq!(changed.len(), 1, "{report}");
    assert_eq!(changed[0]["path"], tree.join("hosts").display().to_string(), "{report}");
    assert_eq!(report["added"], json!([]), "{report}");
    assert_eq!(report["removed"], json!([]), "{report}");
    assert_eq!(first[0]["retcode"], 4, "{first:?}");

    // Nothing changes: several scans later, still one report.
    std::thread::sleep(Duration::from_secs(7));
    assert_eq!(reports().len(), 1, "{:?}", reports());
    // The next change is reported alone.
    std::fs::write(tree.join("new-file"), "dropped in\n").expect("add");
    wait_until(Duration::from_secs(30), "a report of the addition", || reports().len() >= 2);
    let newest = &reports()[0]["report"];
    assert_eq!(newest["added"].as_array().map(Vec::len), Some(1), "{newest}");
    assert_eq!(newest["changed"], json!([]), "{newest}");
    assert_eq!(reports().len(), 2);

    // A changed interval applies without a restart: a long one holds the next change back,
    // a short one again lets it through.
    let pid = agent.pid();
    let applied = || get(&cluster.url(&format!("/v1/hosts/{HOST}"))).1["tasks_applied"]["current"] == true;
    put_task(&cluster, "tree", json!({"attach_to": {"host": HOST}, "kind": "integrity", "spec": {"every": 3600}}));
    wait_until(Duration::from_secs(15), "the agent holds the long interval", applied);
    std::thread::sleep(Duration::from_secs(3));
    std::fs::write(
        tree.join("passwd"),
        "root:x:0:0
mallory:x:0:0
",
    )
    .expect("change");
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(reports().len(), 2, "no scan within the long interval: {:?}", reports());
    put_task(&cluster, "tree", json!({"attach_to": {"host": HOST}, "kind": "integrity", "spec": {"every": 2}}));
    wait_until(Duration::from_secs(30), "the short interval applies", || reports().len() >= 3);
    let newest = &reports()[0]["report"];
    assert_eq!(newest["changed"][0]["path"], tree.join("passwd").display().to_string(), "{newest}");
    assert_eq!(agent.pid(), pid, "the same agent");
    assert!(agent.try_exit_status().is_none(), "the agent still runs");

    // The endpoints take only their parameters.
    let status = |path: &str| get(&cluster.url(path)).0;
    assert_eq!(status(&format!("/v1/hosts/{HOST}/logs")), 400, "path is required");
    assert_eq!(status(&format!("/v1/hosts/{HOST}/logs?path=/x&offset=1")), 400);
    assert_eq!(status(&format!("/v1/hosts/{HOST}/integrity?limit=0")), 400);
    assert_eq!(status(&format!("/v1/hosts/{HOST}/integrity?path=/x")), 400);
    assert_eq!(get(&cluster.url(&format!("/v1/hosts/{HOST}/integrity"))).1["total"], 3);

    // Removing a task stops its runner; the lines stay readable.
    let (status, _) = request("DELETE", &cluster.url("/v1/tasks/applog"), None, None);
    assert_eq!(status, 200);
    wait_until(Duration::from_secs(15), "the log runner stops", || agent.output().contains("applog (log): stopping"));
    has_exactly(&cluster, &app, 17);
}
