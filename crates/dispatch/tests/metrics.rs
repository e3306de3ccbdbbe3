//! The ops channel's `/metrics`, read with a real Prometheus parser (Python's
//! `prometheus_client`; without it these tests print SKIP, except under CI): the
//! dispatcher's requests by route template and status, host jobs by state, fan-out and
//! completion; an agent's jobs by method and outcome, durations, timeouts and refusals.
//! Who may scrape the dispatcher with tokens on.

use polaris_testkit::cluster::*;
use polaris_testkit::scrape::{parser_available, scrape, Scrape};
use polaris_testkit::{free_port, wait_until, RawConn};
use serde_json::json;
use std::time::Duration;

/// A cluster without agents, then one agent for `host` serving metrics; returns the
/// agent's metrics URL.
fn cluster_with_metrics_agent(host: &str) -> (Cluster, String) {
    let mut cluster = Cluster::start(&[]);
    let listen = format!("127.0.0.1:{}", free_port().expect("free port"));
    let workdir = cluster.dir.path().join("hosts").join(host);
    let agent =
        start_agent_with(&cluster.queue.addr, host, &cluster.dispatch.url, &workdir, &[], &["--metrics", &listen]);
    cluster.agents.push((host.to_string(), agent));
    let host_url = cluster.url(&format!("/v1/hosts/{host}"));
    wait_until(Duration::from_secs(15), "the agent registered", || get(&host_url).0 == 200);
    (cluster, format!("http://{listen}/metrics"))
}

fn sync_job(cluster: &Cluster, host: &str, cmd: &str, timeout: u32) -> serde_json::Value {
    let (status, body) = post(
        &cluster.url("/v1/jobs"),
        &json!({"hosts": [host], "method": "sync.bash", "cmd": cmd, "timeout": timeout}),
    );
    assert_eq!(status, 200, "{body}");
    body
}

fn wait_for(url: &str, what: &str, check: impl Fn(&Scrape) -> bool) -> Scrape {
    let mut last = None;
    wait_until(Duration::from_secs(15), what, || {
        let s = scrape(url, None);
        let ok = check(&s);
        last = Some(s);
        ok
    });
    last.expect("scraped")
}

#[test]
fn agent_and_dispatcher_metrics_follow_the_jobs() {
    if !parser_available() {
        return;
    }
    let (cluster, agent_url) = cluster_with_metrics_agent("web-01");

    let before = scrape(&agent_url, None);
    assert_eq!(before.value("polaris_agent_jobs_total", &[("method", "sync.bash")]), None);
    assert_eq!(before.get("polaris_agent_queue_connected", &[]), 1.0);

    let ok = sync_job(&cluster, "web-01", "echo hi", 30);
    assert_eq!(ok["response"][0]["data"], "hi\n", "{ok}");
    let after = scrape(&agent_url, None);
    let jobs =
        |s: &Scrape, outcome: &str| s.get("polaris_agent_jobs_total", &[("method", "sync.bash"), ("outcome", outcome)]);
    assert_eq!(jobs(&after, "succeeded"), 1.0, "{}", after.text);
    assert_eq!(after.get("polaris_agent_job_duration_seconds_count", &[("method", "sync.bash")]), 1.0);
    assert_eq!(after.get("polaris_agent_running_jobs", &[]), 0.0);
    assert_eq!(after.type_of("polaris_agent_job_duration_seconds_count"), Some("histogram"));

    let failed = sync_job(&cluster, "web-01", "exit 3", 30);
    assert_eq!(failed["response"][0]["retcode"], 3, "{failed}");
    let timed_out = sync_job(&cluster, "web-01", "sleep 30", 1);
    assert_eq!(timed_out["response"][0]["resp"], "failed", "{timed_out}");
    let later = scrape(&agent_url, None);
    assert_eq!(jobs(&later, "failed"), 1.0, "{}", later.text);
    assert_eq!(jobs(&later, "timed_out"), 1.0);
    assert_eq!(later.get("polaris_agent_timeouts_total", &[("signal", "SIGTERM")]), 1.0);

    // An envelope that is not signed is buried, not run, and counted as a refusal.
    let mut queue = RawConn::connect(cluster.queue.addr.parse().expect("queue address")).expect("connect");
    assert_eq!(queue.line("use host.web-01\r\n").expect("use"), "USING host.web-01");
    assert!(queue.line("put 0 0 60 5\r\nhello\r\n").expect("put").starts_with("INSERTED"));
    let refused = wait_for(&agent_url, "the refusal counted", |s| {
        s.value("polaris_agent_refusals_total", &[("code", "bad_signature")]) == Some(1.0)
    });
    assert_eq!(jobs(&refused, "succeeded"), 1.0, "a refusal is not a run");

    // The dispatcher: its first scrape counts every state afresh.
    let url = cluster.url("/metrics");
    let (status, body) = get(&cluster.url("/v1/jobs/no-such-job"));
    assert_eq!(status, 404, "{body}");
    let (status, _) = get(&cluster.url("/v1/nothing/here"));
    assert_eq!(status, 404);
    let d = scrape(&url, None);
    let requests = |method: &str, route: &str, status: &str| {
        d.get("polaris_dispatch_http_requests_total", &[("method", method), ("route", route), ("status", status)])
    };
    assert_eq!(requests("POST", "/v1/jobs", "200"), 3.0, "{}", d.text);
    assert_eq!(requests("GET", "/v1/jobs/:id", "404"), 1.0);
    assert_eq!(requests("GET", "unmatched", "404"), 1.0);
    assert!(!d.text.contains("no-such-job"), "raw paths never become labels");
    assert_eq!(d.get("polaris_dispatch_host_jobs", &[("state", "success")]), 2.0, "{}", d.text);
    assert_eq!(d.get("polaris_dispatch_host_jobs", &[("state", "failed")]), 1.0);
    assert_eq!(d.get("polaris_dispatch_host_jobs", &[("state", "pending")]), 0.0);
    assert_eq!(d.get("polaris_dispatch_fanout_seconds_count", &[]), 3.0);
    assert_eq!(d.get("polaris_dispatch_completion_seconds_count", &[]), 3.0);
    assert_eq!(d.get("polaris_dispatch_queue_connected", &[("worker", "enqueuer")]), 1.0);
    assert_eq!(d.get("polaris_dispatch_queue_connected", &[("worker", "results")]), 1.0);
    assert_eq!(d.type_of("polaris_dispatch_completion_seconds_count"), Some("histogram"));
}

#[test]
fn scraping_the_dispatcher_needs_a_token_when_tokens_are_on() {
    if !parser_available() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let tokens = dir.path().join("tokens.json");
    let scrape_token = "scrape-token-0123456789";
    std::fs::write(
        &tokens,
        json!({"tokens": [{"name": "prometheus", "token": scrape_token, "methods": []}]}).to_string(),
    )
    .expect("write tokens");
    let tokens_arg = tokens.to_str().expect("utf-8 path");
    let queue = start_queue(BIG_JOB_SIZE);
    let guarded = start_dispatcher(&queue.addr, &dir.path().join("a"), &["--tokens", tokens_arg]);
    let url = format!("{}/metrics", guarded.url);
    let (status, body) = request("GET", &url, None, None);
    assert_eq!(status, 401, "{body}");
    assert!(body["error"]["message"].is_string(), "the documented error shape: {body}");
    let scraped = scrape(&url, Some(scrape_token));
    assert!(scraped.value("polaris_dispatch_build_info", &[]).is_some());
    // The scrape-only token may not do anything else.
    let (status, _) = request(
        "POST",
        &format!("{}/v1/jobs", guarded.url),
        Some(r#"{"hosts":["h"],"method":"sync.bash","cmd":"ls"}"#),
        Some(scrape_token),
    );
    assert_eq!(status, 403);

    let open =
        start_dispatcher(&queue.addr, &dir.path().join("b"), &["--tokens", tokens_arg, "--metrics-without-token"]);
    scrape(&format!("{}/metrics", open.url), None);
    let (status, _) = request("GET", &format!("{}/v1/jobs", open.url), None, None);
    assert_eq!(status, 401, "only /metrics is opened");

    let elsewhere = start_dispatcher(
        &queue.addr,
        &dir.path().join("c"),
        &["--metrics-without-token", "--allow-client", "10.1.2.3"],
    );
    let (status, _) = request("GET", &format!("{}/metrics", elsewhere.url), None, None);
    assert_eq!(status, 403, "--allow-client applies to /metrics");
}

#[test]
fn the_queue_connection_is_shown_and_reconnections_counted() {
    if !parser_available() {
        return;
    }
    let mut cluster = Cluster::start(&[]);
    let url = cluster.url("/metrics");
    let connected = |s: &Scrape, worker: &str| s.value("polaris_dispatch_queue_connected", &[("worker", worker)]);
    let reconnects = |s: &Scrape, worker: &str| s.get("polaris_dispatch_queue_reconnects_total", &[("worker", worker)]);
    let up = wait_for(&url, "both workers on the queue", |s| {
        connected(s, "enqueuer") == Some(1.0) && connected(s, "results") == Some(1.0)
    });
    assert_eq!((reconnects(&up, "enqueuer"), reconnects(&up, "results")), (0.0, 0.0));

    cluster.stop_queue();
    wait_for(&url, "both workers see the queue gone", |s| {
        connected(s, "enqueuer") == Some(0.0) && connected(s, "results") == Some(0.0)
    });
    cluster.restart_queue();
    let back = wait_for(&url, "both workers back on the queue", |s| {
        connected(s, "enqueuer") == Some(1.0) && connected(s, "results") == Some(1.0)
    });
    assert_eq!((reconnects(&back, "enqueuer"), reconnects(&back, "results")), (1.0, 1.0), "{}", back.text);
}
