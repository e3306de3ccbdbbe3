//! Several dispatchers on one PostgreSQL database: the background work is done once (by
//! the holder of its lease), a sync call on one dispatcher is answered from results
//! another consumed, and a dispatcher that dies hands its work on.
//!
//! Runs on the server env `POLARIS_TEST_DATABASE` names, else on a throwaway one started
//! from the installed PostgreSQL binaries; without either it is skipped (a failure under CI).

use polaris_proto::client::Client;
use polaris_testkit::cluster::*;
use polaris_testkit::postgres::{create_database, test_server, test_server_url};
use polaris_testkit::wait_until;
use serde_json::{json, Value};
use std::io::Write as _;
use std::time::Duration;

const HOSTS: [&str; 3] = ["h1", "h2", "h3"];

/// Who holds lease `name` in the database at `url`.
fn lease_holder(url: &str, name: &str) -> Option<String> {
    let mut client = postgres::Client::connect(url, postgres::NoTls).ok()?;
    let row = client.query_opt("SELECT holder FROM leases WHERE name = $1", &[&name]).ok()??;
    row.try_get(0).ok()
}

/// Whether the dispatcher `proc` holds lease `name` (holders are named `PID-…`).
fn holds(url: &str, name: &str, dispatch: &Dispatch) -> bool {
    lease_holder(url, name).is_some_and(|holder| holder.starts_with(&format!("{}-", dispatch.proc.pid())))
}

fn envelopes_put(queue: &Queue, host: &str) -> u64 {
    let mut client = Client::connect(&queue.addr, Duration::from_secs(2)).expect("connect to the queue");
    client
        .stats_tube(&format!("host.{host}"))
        .expect("stats-tube")
        .get_u64("total-jobs")
        .expect("total-jobs of the tube")
}

fn sync_echo(dispatch: &Dispatch, word: &str) -> Value {
    let body = json!({"hosts": HOSTS, "method": "sync.bash", "cmd": format!("echo {word}"), "timeout": 30});
    let (status, reply) = post(&format!("{}/v1/jobs", dispatch.url), &body);
    assert_eq!(status, 200, "{reply}");
    reply
}

fn assert_all_echoed(reply: &Value, word: &str) {
    let answers = reply["response"].as_array().expect("response array");
    assert_eq!(answers.len(), HOSTS.len(), "{reply}");
    for answer in answers {
        assert_eq!((&answer["resp"], &answer["data"]), (&json!("success"), &json!(format!("{word}\n"))), "{reply}");
    }
}

#[test]
fn two_dispatchers_on_one_database_do_the_work_once_and_answer_each_others_sync_calls() {
    let Some((_server_process, server)) = test_server("the shared-database test") else { return };
    let name = format!("polaris_shared_{}_{}", std::process::id(), wire_now_ms());
    let url = create_database(&server, &name).expect("create the shared database");
    let dir = tempfile::tempdir().expect("tempdir");
    let queue = start_queue(BIG_JOB_SIZE);
    // Each dispatcher puts its own reply tube in the envelopes it puts and consumes only
    // that one, so which dispatcher consumed a result is known: the enqueuer's.
    let args = |tube: &'static str| ["--database", url.as_str(), "--reply-tube", tube, "--lease-secs", "3"];
    let b = start_dispatcher(&queue.addr, &dir.path().join("b"), &args("results.b"));
    wait_until(Duration::from_secs(20), "dispatcher B holds the enqueuer lease", || holds(&url, "enqueuer", &b));
    let a = start_dispatcher(&queue.addr, &dir.path().join("a"), &args("results.a"));
    let _agents: Vec<_> = HOSTS
        .iter()
        .map(|host| start_agent(&queue.addr, host, &a.url, &dir.path().join("hosts").join(host), &[]))
        .collect();
    wait_until(Duration::from_secs(20), "every agent registered, as both dispatchers see", || {
        [&a, &b].iter().all(|d| {
            let (status, body) = get(&format!("{}/v1/hosts", d.url));
            status == 200 && body["hosts"].as_array().is_some_and(|list| list.len() == HOSTS.len())
        })
    });

    // Jobs through both dispatchers at once: every host job is put exactly once.
    let jobs: Vec<String> = (0..10)
        .map(|n| {
            let to = if n % 2 == 0 { &a } else { &b };
            let body = json!({"hosts": HOSTS, "method": "async.bash", "cmd": "true", "timeout": 30});
            let (status, reply) = post(&format!("{}/v1/jobs", to.url), &body);
            assert_eq!(status, 202, "{reply}");
            reply["id"].as_str().expect("job id").to_string()
        })
        .collect();
    wait_until(Duration::from_secs(60), "every async job answered", || {
        jobs.iter().all(|id| {
            let (_, job) = get(&format!("{}/v1/jobs/{id}", a.url));
            job["hosts"].as_array().is_some_and(|hosts| hosts.iter().all(|h| h["state"] == "success"))
        })
    });
    for host in HOSTS {
        assert_eq!(envelopes_put(&queue, host), 10, "host {host}: one envelope per job");
    }

    // A sync call on A, answered from results that only B consumes (its reply tube).
    assert!(holds(&url, "enqueuer", &b), "B still does the enqueuing");
    assert_all_echoed(&sync_echo(&a, "from-b"), "from-b");

    // B dies mid-work; A takes the work over when B's lease runs out, and nothing is
    // enqueued twice.
    let mut b = b;
    b.proc.kill();
    assert_all_echoed(&sync_echo(&a, "after-b"), "after-b");
    assert!(holds(&url, "enqueuer", &a), "A took the enqueuing over");
    for host in HOSTS {
        assert_eq!(envelopes_put(&queue, host), 12, "host {host}: one envelope per job");
    }
}

fn wire_now_ms() -> i64 {
    polaris_ops_wire::wire::unix_now_ms()
}

/// The newest test binary of this profile named `stem` plus cargo's hash
/// (`target/<profile>/deps/<stem>-<hash>`) that has tests (a package's `main.rs` has a test
/// binary of the same stem, without any), if one is built.
fn sibling_test_binary(stem: &str) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let exe = std::env::current_exe().ok()?;
    let deps = exe.parent()?;
    let mut candidates: Vec<(std::time::SystemTime, std::path::PathBuf)> = std::fs::read_dir(deps)
        .ok()?
        .filter_map(|entry| entry.ok())
        .filter(|entry| {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            name.strip_prefix(stem)
                .and_then(|rest| rest.strip_prefix('-'))
                .is_some_and(|hash| !hash.is_empty() && hash.chars().all(|c| c.is_ascii_hexdigit()))
        })
        .filter_map(|entry| {
            let meta = entry.metadata().ok()?;
            let executable = meta.is_file() && meta.permissions().mode() & 0o111 != 0;
            executable.then_some((meta.modified().ok()?, entry.path()))
        })
        .collect();
    candidates.sort();
    candidates.into_iter().rev().map(|(_, path)| path).find(|path| {
        std::process::Command::new(path)
            .args(["--list", "--format", "terse"])
            .output()
            .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).lines().any(|l| l.ends_with(": test")))
    })
}

/// The store's unit tests and the end-to-end suite, run again with every database on
/// PostgreSQL (`POLARIS_TEST_DATABASE`): the same tests pass on both backends. `cargo test`
/// builds every test binary of the package before it runs any, so they are there.
#[test]
fn the_unit_and_end_to_end_suites_pass_on_postgresql() {
    let Some((_server_process, server)) = test_server("the suites on PostgreSQL") else { return };
    if test_server_url().is_some() {
        return; // This whole run is on PostgreSQL already.
    }
    for stem in ["polaris_dispatch", "e2e"] {
        let Some(binary) = sibling_test_binary(stem) else {
            panic!("the {stem} test binary is not built beside {:?}", std::env::current_exe());
        };
        let output = std::process::Command::new(&binary)
            .args(["--test-threads", "2"])
            .env(polaris_testkit::postgres::TEST_DATABASE_ENV, &server)
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", binary.display()));
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{} failed on PostgreSQL:\n{stdout}\n{}",
            binary.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        let summary = stdout.lines().rev().find(|l| l.starts_with("test result:")).unwrap_or_default();
        let _ = writeln!(std::io::stderr(), "{stem} on PostgreSQL: {summary}");
    }
}
