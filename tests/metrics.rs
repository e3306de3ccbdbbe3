//! `polarisd --metrics`: the endpoint is read with a real Prometheus parser (Python's
//! `prometheus_client`; without it the test prints SKIP, except under CI), and its values
//! follow what clients do: jobs by tube and state with the tubes past the top N folded,
//! command counters, connections, the store's commits and files. A bad address stops the
//! start with a message naming it.

use polaris_testkit::scrape::{parser_available, scrape};
use polaris_testkit::{binary, free_port, spawn_polarisd, RawConn};
use std::process::Command;

#[test]
fn metrics_follow_the_queue() {
    if !parser_available() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port().expect("free port");
    let listen = format!("127.0.0.1:{port}");
    let data = dir.path().to_str().expect("utf-8 path");
    let server = spawn_polarisd(&["-b", data, "--metrics", &listen, "--metrics-top-tubes", "2"]).expect("polarisd");
    let url = format!("http://{listen}/metrics");

    let before = scrape(&url, None);
    assert_eq!(before.get("polarisd_jobs", &[("tube", "default"), ("state", "ready")]), 0.0);
    assert_eq!(before.get("polarisd_connections", &[]), 0.0);
    assert_eq!(before.type_of("polarisd_commands_total"), Some("counter"));
    assert_eq!(before.type_of("polarisd_store_commit_seconds_count"), Some("histogram"));
    assert!(before.get("polarisd_uptime_seconds", &[]) >= 0.0);

    let mut conn = RawConn::connect(server.addr()).expect("connect");
    for (tube, jobs) in [("web", 3), ("api", 2), ("cron", 1)] {
        assert_eq!(conn.line(&format!("use {tube}\r\n")).expect("use"), format!("USING {tube}"));
        for _ in 0..jobs {
            assert!(conn.line("put 0 0 60 2\r\nhi\r\n").expect("put").starts_with("INSERTED"));
        }
    }
    let after = scrape(&url, None);
    let jobs = |tube: &str, state: &str| after.get("polarisd_jobs", &[("tube", tube), ("state", state)]);
    assert_eq!(jobs("web", "ready"), 3.0, "{}", after.text);
    assert_eq!(jobs("api", "ready"), 2.0);
    // `cron` (1 job) and `default` (none) are past the top 2.
    assert_eq!(after.value("polarisd_jobs", &[("tube", "cron")]), None);
    assert_eq!(jobs("*other*", "ready"), 1.0);
    assert_eq!(after.get("polarisd_tubes_folded", &[]), 2.0);
    assert_eq!(after.get("polarisd_tubes", &[]), 4.0);
    assert_eq!(after.get("polarisd_jobs_urgent", &[("tube", "web")]), 3.0);
    assert_eq!(after.get("polarisd_commands_total", &[("command", "put")]), 6.0);
    assert_eq!(after.get("polarisd_commands_total", &[("command", "use")]), 3.0);
    assert_eq!(after.get("polarisd_jobs_created_total", &[]), 6.0);
    assert_eq!(after.get("polarisd_connections", &[]), 1.0);
    assert!(after.get("polarisd_store_commits_total", &[]) >= 1.0);
    assert!(after.get("polarisd_store_commit_seconds_count", &[]) >= 1.0);
    assert!(after.get("polarisd_store_bytes", &[("file", "db")]) > 0.0);
    assert!(after.value("polarisd_store_checkpoint_seconds_count", &[]).is_some(), "{}", after.text);
    // Under -f 50 (the default) the store's thread fsyncs the WAL after those commits.
    polaris_testkit::wait_until(std::time::Duration::from_secs(10), "a background fsync observed", || {
        scrape(&url, None).get("polarisd_store_fsync_seconds_count", &[]) >= 1.0
    });

    // A reserve and a bury move one job of `web` from ready to buried.
    assert_eq!(conn.line("watch web\r\n").expect("watch"), "WATCHING 2");
    let reserved = conn.line("reserve\r\n").expect("reserve");
    let id = reserved.split(' ').nth(1).expect("job id").to_string();
    assert_eq!(conn.line(&format!("bury {id} 0\r\n")).expect("bury"), "BURIED");
    let later = scrape(&url, None);
    let jobs = |tube: &str, state: &str| later.get("polarisd_jobs", &[("tube", tube), ("state", state)]);
    assert_eq!((jobs("web", "ready"), jobs("web", "buried")), (2.0, 1.0), "{}", later.text);
    assert_eq!(later.get("polarisd_commands_total", &[("command", "reserve")]), 1.0);
    assert_eq!(later.get("polarisd_commands_total", &[("command", "bury")]), 1.0);
    drop(conn);
}

#[test]
fn a_bad_metrics_address_stops_the_start() {
    let out =
        Command::new(binary("polarisd")).args(["-p", "0", "--metrics", "no-port-here"]).output().expect("run polarisd");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--metrics \"no-port-here\""), "{stderr}");
}

#[test]
fn other_paths_are_not_metrics() {
    let port = free_port().expect("free port");
    let listen = format!("127.0.0.1:{port}");
    let _server = spawn_polarisd(&["--metrics", &listen]).expect("polarisd");
    let (status, _) = polaris_testkit::cluster::request_text("GET", &format!("http://{listen}/nope"), None, None);
    assert_eq!(status, 404);
    let (status, _) =
        polaris_testkit::cluster::request_text("POST", &format!("http://{listen}/metrics"), Some("{}"), None);
    assert_eq!(status, 405);
}
