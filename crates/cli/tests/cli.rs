//! `polaris` against a real cluster on loopback (polarisd, polaris-dispatch, agents):
//! `run` prints each host's output and a summary and exits 0, or 1 when a host fails;
//! `--json` prints the job document; `jobs`, `job`, `hosts`, `tree`, `tasks` and `cancel`
//! show a small fleet; API errors come with their code (exit 3), an unreachable
//! dispatcher is exit 4; completions are generated. (This test also makes `cargo test`
//! build the binary.)

use polaris_testkit::cluster::{request, Cluster};
use polaris_testkit::free_port;
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Command, Output};

const POLARIS: &str = env!("CARGO_BIN_EXE_polaris");

/// Runs `polaris --url URL ARGS…` with no config file, no token and no colour.
fn polaris(url: &str, args: &[&str]) -> Output {
    let home = tempfile::tempdir().expect("tempdir");
    Command::new(POLARIS)
        .arg("--url")
        .arg(url)
        .args(args)
        .env("HOME", home.path())
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("POLARIS_TOKEN")
        .env_remove("POLARIS_URL")
        .env("NO_COLOR", "1")
        .output()
        .expect("run polaris")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_exit(out: &Output, code: i32) {
    assert_eq!(out.status.code(), Some(code), "stdout:\n{}\nstderr:\n{}", stdout(out), stderr(out));
}

#[test]
fn version_and_help() {
    polaris_testkit::process::assert_version_and_help(
        Path::new(POLARIS),
        "polaris",
        &["POLARIS_URL", "POLARIS_TOKEN", "NO_COLOR", "Exit codes", "config.toml"],
    );
}

#[test]
fn completions_are_generated() {
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(POLARIS).args(["completions", shell]).output().expect("run polaris");
        assert_exit(&out, 0);
        let script = stdout(&out);
        assert!(script.contains("polaris") && script.contains("run") && script.contains("target-node"), "{script}");
    }
}

#[test]
fn run_follows_a_job_and_its_exit_tells_how_it_went() {
    let cluster = Cluster::start(&["web-01", "web-02"]);
    let url = cluster.dispatch.url.as_str();

    let out = polaris(url, &["run", "--hosts", "web-01,web-02", "--", "echo", "hi"]);
    assert_exit(&out, 0);
    let text = stdout(&out);
    assert!(text.contains("web-01 | hi\n") && text.contains("web-02 | hi\n"), "{text}");
    assert!(text.contains("2 hosts: 2 succeeded, 0 failed"), "{text}");
    assert!(!text.contains('\x1b'), "no colour when NO_COLOR is set or stdout is no terminal");

    let out = polaris(url, &["run", "--hosts", "web-01", "--group", "--", "printf 'a\\nb\\n'"]);
    assert_exit(&out, 0);
    assert!(stdout(&out).starts_with("== web-01 (success, exit 0) ==\na\nb\n"), "{}", stdout(&out));

    let out = polaris(url, &["run", "--hosts", "web-01,web-99", "--", "exit 3"]);
    assert_exit(&out, 1);
    let text = stdout(&out);
    assert!(text.contains("web-01 ! success 3"), "{text}");
    assert!(text.contains("No such host"), "{text}");
    assert!(text.contains("2 hosts: 0 succeeded, 2 failed"), "{text}");

    let out = polaris(url, &["--json", "run", "--hosts", "web-02", "--timeout", "10", "--", "echo", "json"]);
    assert_exit(&out, 0);
    let doc: Value = serde_json::from_str(&stdout(&out)).expect("--json prints one JSON document");
    assert_eq!(doc["done"], true);
    assert_eq!(doc["method"], "async.bash");
    assert_eq!(doc["timeout"], 10);
    assert_eq!(doc["hosts"][0]["data"], "json\n");
    let id = doc["id"].as_str().expect("id").to_string();

    // The same job, looked at again.
    let out = polaris(url, &["job", &id]);
    assert_exit(&out, 0);
    assert!(stdout(&out).contains(&format!("job      {id}")) && stdout(&out).contains("web-02"), "{}", stdout(&out));
    let out = polaris(url, &["job", &id, "--follow"]);
    assert_exit(&out, 0);
    assert!(stdout(&out).contains("web-02 | json"), "{}", stdout(&out));
    let out = polaris(url, &["jobs"]);
    assert_exit(&out, 0);
    assert!(stdout(&out).contains(&id) && stdout(&out).contains("4 jobs"), "{}", stdout(&out));
    let out = polaris(url, &["--json", "jobs", "--limit", "2"]);
    assert_exit(&out, 0);
    let page: Value = serde_json::from_str(&stdout(&out)).expect("JSON");
    assert_eq!((page["total"].as_u64(), page["jobs"].as_array().map(Vec::len)), (Some(4), Some(2)));

    // API errors: the dispatcher's message and code, exit 3.
    let out = polaris(url, &["job", "no-such-job"]);
    assert_exit(&out, 3);
    assert!(stderr(&out).contains("no job with this id (error 0x"), "{}", stderr(&out));
    let out = polaris(url, &["run", "--target-node", "Nowhere", "--", "true"]);
    assert_exit(&out, 3);
    assert!(stderr(&out).contains("field target.nodes[0]"), "{}", stderr(&out));

    // Nobody there: exit 4.
    let nobody = format!("http://127.0.0.1:{}", free_port().expect("free port"));
    let out = polaris(&nobody, &["hosts"]);
    assert_exit(&out, 4);
    assert!(stderr(&out).contains("cannot reach the dispatcher"), "{}", stderr(&out));
}

#[test]
fn hosts_tree_tasks_and_targets() {
    let cluster = Cluster::start(&["web-01", "web-02"]);
    let url = cluster.dispatch.url.as_str();
    for (path, level) in [("Demo", "product"), ("Demo/API", "service"), ("Demo/DB", "service")] {
        let (status, body) =
            request("POST", &cluster.url("/v1/nodes"), Some(&json!({"path": path, "level": level}).to_string()), None);
        assert_eq!(status, 201, "{body}");
    }
    let place = |host: &str, node: &str, role: &str| {
        let body = json!({"nodes": [node], "labels": {"role": role}}).to_string();
        let (status, reply) = request("PUT", &cluster.url(&format!("/v1/hosts/{host}")), Some(&body), None);
        assert_eq!(status, 200, "{reply}");
    };
    place("web-01", "Demo/API", "web");
    place("web-02", "Demo/DB", "db");
    let task = json!({"attach_to": {"node": "Demo"}, "kind": "schedule", "cron": "*/5 * * * *", "cmd": "uptime -p"});
    let (status, reply) = request("PUT", &cluster.url("/v1/tasks/uptime"), Some(&task.to_string()), None);
    assert!(status == 201 || status == 200, "{reply}");

    let out = polaris(url, &["hosts"]);
    assert_exit(&out, 0);
    let text = stdout(&out);
    assert!(text.starts_with("HOST "), "{text}");
    assert!(text.contains("web-01") && text.contains("Demo/API") && text.contains("role=web"), "{text}");
    assert!(text.ends_with("2 hosts\n"), "{text}");

    let out = polaris(url, &["tree"]);
    assert_exit(&out, 0);
    assert_eq!(
        stdout(&out),
        "└── Demo (product, 2 hosts)\n    ├── API (service, 1 host)\n    └── DB (service, 1 host)\n",
    );
    let out = polaris(url, &["--json", "tree"]);
    assert_exit(&out, 0);
    let tree: Value = serde_json::from_str(&stdout(&out)).expect("JSON");
    assert_eq!(tree["nodes"][0]["path"], "Demo");

    let out = polaris(url, &["tasks", "web-01"]);
    assert_exit(&out, 0);
    let text = stdout(&out);
    assert!(text.contains("uptime") && text.contains("Demo") && text.contains("cron */5 * * * *: uptime -p"), "{text}");
    let out = polaris(url, &["--json", "tasks", "web-02"]);
    let tasks: Value = serde_json::from_str(&stdout(&out)).expect("JSON");
    assert_eq!(tasks["tasks"][0]["name"], "uptime");

    // Targets: a node, a label.
    let out = polaris(url, &["run", "--target-node", "Demo/API", "--", "echo", "api"]);
    assert_exit(&out, 0);
    assert!(stdout(&out).contains("web-01 | api") && !stdout(&out).contains("web-02"), "{}", stdout(&out));
    let out = polaris(url, &["run", "--label", "role=db", "--", "echo", "db"]);
    assert_exit(&out, 0);
    assert!(stdout(&out).contains("web-02 | db") && !stdout(&out).contains("web-01 |"), "{}", stdout(&out));
    let out = polaris(url, &["run", "--target-node", "Demo", "--exclude-hosts", "web-02", "--", "echo", "x"]);
    assert_exit(&out, 0);
    assert!(stdout(&out).contains("1 hosts: 1 succeeded"), "{}", stdout(&out));

    // Cancel: a job for a host whose agent never comes is revoked at once.
    let (status, accepted) = request(
        "POST",
        &cluster.url("/v1/jobs"),
        Some(
            &json!({"target": {"hosts": ["web-01"], "nodes": ["Demo/DB"]}, "method": "async.bash", "cmd": "sleep 30"})
                .to_string(),
        ),
        None,
    );
    assert_eq!(status, 202, "{accepted}");
    let id = accepted["id"].as_str().expect("id");
    let out = polaris(url, &["cancel", id]);
    assert_exit(&out, 0);
    assert!(stdout(&out).contains(&format!("job {id} cancelled")) && stdout(&out).contains("HOST"), "{}", stdout(&out));
}

#[test]
fn a_config_file_names_the_dispatcher() {
    let cluster = Cluster::start(&[]);
    let home = tempfile::tempdir().expect("tempdir");
    let config = home.path().join(".config/polaris/config.toml");
    std::fs::create_dir_all(config.parent().expect("dir")).expect("mkdir");
    std::fs::write(&config, format!("url = \"{}\"\n", cluster.dispatch.url)).expect("write");
    let run = |extra: &[(&str, &str)], args: &[&str]| {
        Command::new(POLARIS)
            .args(args)
            .env("HOME", home.path())
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("POLARIS_URL")
            .envs(extra.iter().copied())
            .output()
            .expect("run polaris")
    };
    let out = run(&[], &["hosts"]);
    assert_exit(&out, 0);
    assert!(stdout(&out).ends_with("0 hosts\n"), "{}", stdout(&out));
    // The environment wins over the file.
    let nobody = format!("http://127.0.0.1:{}", free_port().expect("free port"));
    assert_exit(&run(&[("POLARIS_URL", &nobody)], &["hosts"]), 4);
    std::fs::write(&config, "url = 5\n").expect("write");
    let out = run(&[], &["hosts"]);
    assert_exit(&out, 2);
    assert!(stderr(&out).contains("config.toml"), "{}", stderr(&out));
}

/// `polaris run` shows a running command's output as it is printed: the first line is on
/// its stdout while the command still waits (for a file this test creates only once it
/// has read that line), each line once.
#[test]
fn run_streams_output_while_the_command_runs() {
    use std::io::{BufRead, BufReader};
    let cluster = Cluster::start(&["s1"]);
    let gate = cluster.dir.path().join("gate");
    let cmd = format!("echo first; while [ ! -e {} ]; do sleep 0.1; done; echo second", gate.display());
    let home = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(POLARIS)
        .args(["--url", &cluster.url(""), "run", "--hosts", "s1", "--timeout", "60", "--", &cmd])
        .env("HOME", home.path())
        .env_remove("POLARIS_TOKEN")
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run polaris");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let first = lines.next().expect("a line").expect("utf-8");
    assert_eq!(first, "s1 | first");
    // Only now may the command go on: the line above came while it ran.
    std::fs::write(&gate, "").expect("open the gate");
    let rest: Vec<String> = lines.map(|l| l.expect("utf-8")).collect();
    let status = child.wait().expect("wait");
    assert!(status.success(), "{rest:?}");
    assert_eq!(rest.iter().filter(|l| l.contains("| first")).count(), 0, "first printed twice: {rest:?}");
    assert_eq!(rest.iter().filter(|l| *l == "s1 | second").count(), 1, "{rest:?}");
}
