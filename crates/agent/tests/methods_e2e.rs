//! The integrity and log methods end to end: `POST /v1/jobs` to a real dispatcher, the
//! queue, an agent started with `--config`, and back; a tampered baseline, a path that
//! escapes the log roots, and a SIGHUP reload (a bad file keeps the old configuration).

use polaris_ops_wire::codes::Code;
use polaris_testkit::cluster::{get, post, Cluster, TEST_SECRET};
use polaris_testkit::process::{binary, wait_until, Proc};
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const HOST: &str = "integrity-01";

fn start_agent(cluster: &Cluster, config: &Path, state_file: &Path) -> Proc {
    let child = Command::new(binary("polaris-agent"))
        .args(["--queue", &cluster.queue.addr, "--host-id", HOST, "--dispatch", &cluster.dispatch.url])
        .arg("--state-file")
        .arg(state_file)
        .arg("--config")
        .arg(config)
        .args(["--kill-grace-ms", "500", "--drain-timeout", "5"])
        .env("POLARIS_SECRET", TEST_SECRET)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start polaris-agent");
    Proc::new("agent", child)
}

fn wait_until_registered(cluster: &Cluster, host: &str) {
    wait_until(Duration::from_secs(15), "the agent registered", || {
        let (status, body) = get(&cluster.url("/v1/hosts"));
        status == 200 && body["hosts"].as_array().is_some_and(|list| list.iter().any(|h| h["id"] == host))
    });
}

/// Runs a sync job on the host and returns its one response entry.
fn run(cluster: &Cluster, body: Value) -> Value {
    let mut body = body;
    body["hosts"] = json!([HOST]);
    let (status, reply) = post(&cluster.url("/v1/jobs"), &body);
    assert_eq!(status, 200, "{body}: {reply}");
    reply["response"][0].clone()
}

fn failed_with(entry: &Value, code: Code) {
    assert_eq!(entry["resp"], "failed", "{entry}");
    assert_eq!(entry["retcode"], u64::from(code.value()), "{entry}");
}

fn report(entry: &Value) -> Value {
    assert_eq!(entry["resp"], "success", "{entry}");
    serde_json::from_str(entry["data"].as_str().unwrap_or("")).unwrap_or_else(|e| panic!("report json: {e}: {entry}"))
}

#[test]
fn integrity_and_log_jobs_through_the_dispatcher() {
    let cluster = Cluster::start(&[]);
    let root = std::fs::canonicalize(cluster.dir.path()).expect("canonical").join("host");
    let tree = root.join("tree");
    let logs = root.join("logs");
    std::fs::create_dir_all(tree.join("etc")).expect("mkdir");
    std::fs::create_dir_all(&logs).expect("mkdir");
    std::fs::write(tree.join("etc/passwd"), "root:x:0:0\n").expect("write");
    std::fs::write(tree.join("etc/hosts"), "127.0.0.1 localhost\n").expect("write");
    std::fs::write(logs.join("app.log"), "start\nerror: disk full\nok\nerror: again\nend\n").expect("write");
    std::fs::write(root.join("secret.txt"), "not a log\n").expect("write");
    std::os::unix::fs::symlink(root.join("secret.txt"), logs.join("sneaky.log")).expect("symlink");
    let rules = root.join("aide.conf");
    std::fs::write(&rules, format!("Mine = p+u+g+s+sha256\n{} Mine\n", tree.display())).expect("rules");
    let config = root.join("agent.toml");
    let good_config = format!(
        "state_dir = \"{}\"\n[integrity]\nrules = \"{}\"\n[log]\nroots = [\"{}\"]\n",
        root.join("state").display(),
        rules.display(),
        logs.display()
    );
    std::fs::write(&config, &good_config).expect("config");
    let agent = start_agent(&cluster, &config, &root.join("agent.json"));
    wait_until_registered(&cluster, HOST);

    // The dispatcher refuses a command for a method that runs none.
    let (status, reply) =
        post(&cluster.url("/v1/jobs"), &json!({"hosts": [HOST], "method": "integrity.check", "cmd": "id"}));
    assert_eq!((status, reply["error"]["field"].clone()), (400, json!("cmd")), "{reply}");

    failed_with(&run(&cluster, json!({"method": "integrity.check"})), Code::BaselineMissing);
    let init = run(&cluster, json!({"method": "integrity.init"}));
    assert_eq!(init["retcode"], 0, "{init}");
    assert_eq!(report(&init)["baseline"]["written"]["entries"], 4, "{init}");
    let clean = run(&cluster, json!({"method": "integrity.check"}));
    assert_eq!((clean["retcode"].clone(), report(&clean)["summary"]["changed"].clone()), (json!(0), json!(0)));

    std::fs::write(tree.join("etc/passwd"), "root:x:0:0\nmallory:x:0:0\n").expect("write");
    std::fs::write(tree.join("etc/new"), "dropped in\n").expect("write");
    let check = run(&cluster, json!({"method": "integrity.check"}));
    assert_eq!(check["retcode"], 1 | 4, "{check}");
    let found = report(&check);
    assert_eq!(found["added"][0]["path"], tree.join("etc/new").display().to_string());
    assert_eq!(found["changed"][0]["path"], tree.join("etc/passwd").display().to_string());
    let attributes = &found["changed"][0]["attributes"];
    assert!(attributes.get("sha256").is_some() && attributes.get("size").is_some(), "{found}");
    // update accepts the change; the next check is clean.
    let update = run(&cluster, json!({"method": "integrity.update"}));
    assert_eq!(update["retcode"], 1 | 4, "{update}");
    assert_eq!(run(&cluster, json!({"method": "integrity.check"}))["retcode"], 0);

    // Someone edits a file and the baseline to match: caught.
    let baseline_path = root.join("state").join("integrity.baseline");
    let baseline = std::fs::read_to_string(&baseline_path).expect("baseline");
    std::fs::write(tree.join("etc/hosts"), "6.6.6.6 localhost\n").expect("write");
    std::fs::write(&baseline_path, baseline.replacen("\"size\":20", "\"size\":18", 1)).expect("edit");
    failed_with(&run(&cluster, json!({"method": "integrity.check"})), Code::BaselineTampered);

    // Logs: inside the roots, and not outside them.
    let app = logs.join("app.log").display().to_string();
    let tail = run(&cluster, json!({"method": "log.tail", "args": {"path": app, "lines": 2}}));
    assert_eq!((tail["resp"].clone(), tail["data"].clone()), (json!("success"), json!("error: again\nend\n")));
    let (status, reply) = post(
        &cluster.url("/v1/jobs"),
        &json!({"hosts": [HOST], "method": "log.grep", "args": {"path": app, "pattern": "^error", "context": 1}}),
    );
    assert_eq!(status, 200, "{reply}");
    let grep = reply["response"][0].clone();
    // The job keeps its args.
    let (_, job) = get(&cluster.url(&format!("/v1/jobs/{}", reply["id"].as_str().unwrap_or(""))));
    assert_eq!(job["args"], json!({"path": app, "pattern": "^error", "context": 1}), "{job}");
    assert_eq!(grep["data"], "1-start\n2:error: disk full\n3-ok\n4:error: again\n5-end\n", "{grep}");
    let sneaky = logs.join("sneaky.log").display().to_string();
    failed_with(&run(&cluster, json!({"method": "log.tail", "args": {"path": sneaky}})), Code::PathNotAllowed);
    let dotdot = format!("{}/../secret.txt", logs.display());
    failed_with(&run(&cluster, json!({"method": "log.tail", "args": {"path": dotdot}})), Code::PathNotAllowed);

    // SIGHUP: a bad file keeps what is in force...
    std::fs::write(&config, format!("{good_config}colour = \"blue\"\n")).expect("config");
    agent.signal("HUP").expect("SIGHUP");
    wait_until(Duration::from_secs(10), "the agent refusing the bad config", || {
        agent.output().contains("keeping the configuration in force")
    });
    assert!(agent.output().contains("colour"), "the error names the unknown key: {}", agent.output());
    assert_eq!(run(&cluster, json!({"method": "log.tail", "args": {"path": app, "lines": 1}}))["data"], "end\n");
    // ...and a good one is taken: without [log], log jobs are not configured.
    std::fs::write(&config, format!("[integrity]\nrules = \"{}\"\n", rules.display())).expect("config");
    agent.signal("HUP").expect("SIGHUP");
    wait_until(Duration::from_secs(10), "the agent reloading", || agent.output().contains("SIGHUP: reloaded"));
    failed_with(&run(&cluster, json!({"method": "log.tail", "args": {"path": app}})), Code::LogsNotConfigured);
}
