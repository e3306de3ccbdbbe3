//! End to end: a queue, `polaris-dispatch` and several `polaris-agent` processes on
//! loopback, driven through the REST API.
//!
//! By default the queue is `polarisd`; `POLARIS_TEST_QUEUE=beanstalkd` runs the same tests
//! against `/usr/bin/beanstalkd`.

use polaris_ops_wire::codes::Code;
use polaris_ops_wire::wire::{self, HostResult, JobEnvelope, Method, Resp, Secret};
use polaris_proto::client::{self, Client};
use polaris_testkit::cluster::*;
use polaris_testkit::{pid_gone, wait_until};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn code(c: Code) -> Value {
    json!(c.value())
}

fn host_states(job: &Value) -> Vec<(String, String)> {
    job["hosts"]
        .as_array()
        .expect("hosts array")
        .iter()
        .map(|h| (h["host"].as_str().unwrap_or("").to_string(), h["state"].as_str().unwrap_or("").to_string()))
        .collect()
}

fn queue_client(queue: &Queue) -> Client {
    Client::connect(&queue.addr, Duration::from_secs(2)).expect("connect to queue")
}

fn test_secret() -> Secret {
    Secret::new(TEST_SECRET.as_bytes().to_vec()).expect("test secret")
}

/// The design's example: two hosts, one unknown, answered in the documented shape, in
/// request order.
#[test]
fn seed_example_answers_in_documented_shape() {
    let cluster = Cluster::start(&["alpha", "beta", "gamma"]);
    let id = "6f1c1d6e-6a8e-4c8e-9d5e-2b7a1c3d4e5f";
    let request_body =
        json!({"id": id, "hosts": ["alpha", "no-such-host"], "method": "sync.bash", "cmd": "ls", "timeout": 30});
    let (status, text) = request_text("POST", &cluster.url("/v1/jobs"), Some(&request_body.to_string()), None);
    assert_eq!(status, 200, "{text}");
    // Fields come in the documented order, as a person reading the reply expects.
    let positions: Vec<usize> = ["\"host\"", "\"resp\"", "\"retcode\"", "\"message\"", "\"data\""]
        .iter()
        .map(|key| text.find(key).unwrap_or_else(|| panic!("{key} missing from {text}")))
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{text}");
    let body: Value = serde_json::from_str(&text).expect("JSON reply");
    assert_eq!(
        body,
        json!({
            "id": id,
            "response": [
                {"host": "alpha", "resp": "success", "retcode": 0, "message": "Normal termination", "data": "README.txt\n"},
                {"host": "no-such-host", "resp": "failed", "retcode": Code::NoSuchHost.value(), "message": "No such host", "data": ""},
            ]
        })
    );

    // Without an id one is generated; a reused id answers 409.
    let (status, body) = post(
        &cluster.url("/v1/jobs"),
        &json!({"hosts": ["beta", "gamma"], "method": "sync.bash", "cmd": "echo $((6*7)); exit 3"}),
    );
    assert_eq!(status, 200, "{body}");
    assert!(uuid::Uuid::parse_str(body["id"].as_str().expect("id")).is_ok());
    for (entry, host) in body["response"].as_array().expect("response").iter().zip(["beta", "gamma"]) {
        assert_eq!(entry["host"], host);
        assert_eq!(entry["resp"], "success");
        assert_eq!(entry["retcode"], 3);
        assert_eq!(entry["data"], "42\n");
    }
    let (status, body) =
        post(&cluster.url("/v1/jobs"), &json!({"id": id, "hosts": ["alpha"], "method": "sync.bash", "cmd": "ls"}));
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], code(Code::DuplicateJobId));
    assert_eq!(body["error"]["field"], "id");
}

/// A command that traps SIGTERM and leaves a background child outlives its timeout: the
/// whole group is killed (SIGTERM, then SIGKILL) and the host reports the timeout code.
#[test]
fn command_outliving_timeout_is_killed_with_its_process_group() {
    let cluster = Cluster::start(&["alpha", "beta", "gamma"]);
    let pids = cluster.dir.path().join("pids");
    let cmd =
        format!("trap '' TERM; sleep 300 & echo $! > {p}; echo $$ >> {p}; echo started; wait", p = pids.display());
    let started = Instant::now();
    let (status, body) =
        post(&cluster.url("/v1/jobs"), &json!({"hosts": ["alpha"], "method": "sync.bash", "cmd": cmd, "timeout": 1}));
    let elapsed = started.elapsed();
    assert_eq!(status, 200, "{body}");
    let entry = &body["response"][0];
    assert_eq!(entry["resp"], "failed", "{body}");
    assert_eq!(entry["retcode"], code(Code::ExecTimeout));
    assert_eq!(entry["message"], "Timed out after 1s: process group killed with SIGKILL");
    assert_eq!(entry["data"], "started\n");
    // 1 s timeout + 0.5 s kill grace, well before the sync deadline.
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
    let pids = std::fs::read_to_string(&pids).expect("the command wrote its pids");
    for pid in pids.lines() {
        let pid: i32 = pid.trim().parse().expect("pid");
        assert!(pid_gone(pid), "process {pid} of the timed-out command is still alive");
    }
}

/// More than 64 KiB of output: 64 KiB are kept and the message says it was truncated.
#[test]
fn output_over_64k_is_truncated() {
    let cluster = Cluster::start(&["alpha", "beta", "gamma"]);
    let (status, body) = post(
        &cluster.url("/v1/jobs"),
        &json!({"hosts": ["beta"], "method": "sync.bash", "cmd": "head -c 100000 /dev/zero | tr '\\0' a; echo tail >&2"}),
    );
    assert_eq!(status, 200, "{body}");
    let entry = &body["response"][0];
    assert_eq!(entry["resp"], "success", "{}", entry["message"]);
    assert_eq!(entry["retcode"], 0);
    assert_eq!(entry["message"], "Normal termination; output truncated to 65536 of 100005 bytes");
    let data = entry["data"].as_str().expect("data");
    assert_eq!(data.len(), 65536);
    assert!(data.bytes().all(|b| b == b'a'));
    let job = get(&cluster.url(&format!("/v1/jobs/{}", body["id"].as_str().expect("id")))).1;
    assert_eq!(job["hosts"][0]["truncated"], true);
}

/// A queue whose max job size is below 64 KiB answers JOB_TOO_BIG to the full result; the
/// agent cuts the output further and the result still arrives.
#[test]
fn result_larger_than_queue_job_size_is_cut_not_lost() {
    let cluster = Cluster::start_with(&["alpha", "beta", "gamma"], 30_000, &[], &[]);
    let (status, body) = post(
        &cluster.url("/v1/jobs"),
        &json!({"hosts": ["gamma", "alpha"], "method": "sync.bash", "cmd": "head -c 100000 /dev/zero | tr '\\0' b"}),
    );
    assert_eq!(status, 200, "{body}");
    for entry in body["response"].as_array().expect("response") {
        assert_eq!(entry["resp"], "success", "{}", entry["message"]);
        let data = entry["data"].as_str().expect("data");
        assert!(data.len() > 20_000 && data.len() < 30_000, "kept {} bytes", data.len());
        let message = entry["message"].as_str().expect("message");
        assert!(message.contains("to fit the queue's max job size"), "{message}");
    }
}

/// Async answers 202 with the id at once; GET shows every host, unknown ones included, and
/// their results once they arrive; GET /v1/jobs pages.
#[test]
fn async_job_then_get_reports_every_host() {
    let cluster = Cluster::start(&["alpha", "beta", "gamma"]);
    let started = Instant::now();
    let (status, body) = post(
        &cluster.url("/v1/jobs"),
        &json!({"hosts": ["alpha", "ghost", "beta", "gamma"], "method": "async.bash", "cmd": "sleep 1; echo done-$PWD", "timeout": 10}),
    );
    assert_eq!(status, 202, "{body}");
    assert!(started.elapsed() < Duration::from_millis(900), "async must not wait for the command");
    let id = body["id"].as_str().expect("id").to_string();
    let url = cluster.url(&format!("/v1/jobs/{id}"));

    let (status, job) = get(&url);
    assert_eq!(status, 200);
    let states = host_states(&job);
    assert_eq!(states.iter().map(|(h, _)| h.as_str()).collect::<Vec<_>>(), ["alpha", "ghost", "beta", "gamma"]);
    assert_eq!(states[1].1, "failed");
    assert_eq!(job["hosts"][1]["retcode"], code(Code::NoSuchHost));
    for (host, state) in [&states[0], &states[2], &states[3]] {
        assert!(["pending", "ready", "reserved"].contains(&state.as_str()), "{host}: {state}");
    }
    assert_eq!(job["done"], false);

    wait_until(Duration::from_secs(15), "async job done", || get(&url).1["done"] == true);
    let job = get(&url).1;
    for (index, host) in [(0, "alpha"), (2, "beta"), (3, "gamma")] {
        let entry = &job["hosts"][index];
        assert_eq!(entry["state"], "success", "{entry}");
        assert_eq!(entry["retcode"], 0);
        let expected = format!("done-{}\n", cluster.workdir(host).display());
        assert_eq!(entry["data"], expected.as_str());
    }

    // Paging: two jobs, one per page.
    let (status, _) =
        post(&cluster.url("/v1/jobs"), &json!({"hosts": ["alpha"], "method": "async.bash", "cmd": "true"}));
    assert_eq!(status, 202);
    let (status, page) = get(&cluster.url("/v1/jobs?limit=1"));
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["total"], 2);
    assert_eq!(page["jobs"].as_array().map(Vec::len), Some(1));
    assert_eq!(page["next_offset"], 1);
    let (_, page2) = get(&cluster.url("/v1/jobs?limit=1&offset=1"));
    assert_eq!(page2["jobs"][0]["id"], id.as_str());
    assert_eq!(page2["jobs"][0]["hosts"], 4);
    assert_eq!(page2["jobs"][0]["states"]["success"], 3);
    assert_eq!(page2["next_offset"], Value::Null);
    let (status, err) = get(&cluster.url("/v1/jobs?limit=abc"));
    assert_eq!((status, err["error"]["field"].clone()), (400, json!("limit")));
}

/// `sync.query` answers host facts from /proc.
#[test]
fn sync_query_reports_host_facts() {
    let cluster = Cluster::start(&["alpha", "beta", "gamma"]);
    let (status, body) = post(
        &cluster.url("/v1/jobs"),
        &json!({"hosts": ["alpha", "beta", "gamma"], "method": "sync.query", "cmd": ""}),
    );
    assert_eq!(status, 200, "{body}");
    let response = body["response"].as_array().expect("response");
    assert_eq!(response.len(), 3);
    for entry in response {
        assert_eq!(entry["resp"], "success", "{entry}");
        assert_eq!(entry["message"], "Query answered");
        let facts: Value = serde_json::from_str(entry["data"].as_str().expect("data")).expect("facts are JSON");
        assert!(!facts["hostname"].as_str().unwrap_or("").is_empty(), "{facts}");
        assert!(facts["cpu_count"].as_u64().unwrap_or(0) >= 1, "{facts}");
        assert_eq!(facts["load"].as_array().map(Vec::len), Some(3));
        assert!(facts["memory"]["total_kib"].as_u64().unwrap_or(0) > 0, "{facts}");
        assert!(facts["uptime_secs"].as_f64().unwrap_or(0.0) > 0.0, "{facts}");
        assert!(facts["users"].is_array());
        let addresses = facts["addresses"].as_array().expect("addresses");
        assert!(addresses.iter().any(|a| a == "127.0.0.1"), "{facts}");
    }
}

/// The dispatcher crashes while an async job runs; results wait in the reply tube and are
/// recorded when it comes back; every host (running, offline, unknown) is still reported.
#[test]
fn dispatcher_restart_mid_async_job_loses_nothing() {
    let mut cluster = Cluster::start(&["alpha", "beta", "gamma"]);
    // Registered, but its agent never runs: it must show up, then expire.
    let (status, _) = post(&cluster.url("/v1/hosts"), &json!({"id": "offline", "hostname": "nowhere"}));
    assert_eq!(status, 201);
    let (status, body) = post(
        &cluster.url("/v1/jobs"),
        &json!({"hosts": ["alpha", "beta", "gamma", "offline", "ghost"], "method": "async.bash", "cmd": "sleep 2; echo finished", "timeout": 5}),
    );
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().expect("id").to_string();
    wait_until(Duration::from_secs(5), "all hosts on the queue", || {
        host_states(&get(&cluster.url(&format!("/v1/jobs/{id}"))).1).iter().all(|(_, s)| s != "pending")
    });

    cluster.crash_dispatcher();
    let mut queue = queue_client(&cluster.queue);
    wait_until(Duration::from_secs(10), "three results waiting in the reply tube", || {
        queue.stats_tube(wire::DEFAULT_REPLY_TUBE).map(|s| s.get_u64("current-jobs-ready") == Some(3)).unwrap_or(false)
    });

    cluster.restart_dispatcher();
    let url = cluster.url(&format!("/v1/jobs/{id}"));
    let (status, job) = get(&url);
    assert_eq!(status, 200, "the job survives the restart");
    assert_eq!(host_states(&job).len(), 5);
    wait_until(Duration::from_secs(15), "every host final after the restart", || get(&url).1["done"] == true);
    let job = get(&url).1;
    let states = host_states(&job);
    assert_eq!(
        states,
        [("alpha", "success"), ("beta", "success"), ("gamma", "success"), ("offline", "expired"), ("ghost", "failed")]
            .map(|(h, s)| (h.to_string(), s.to_string()))
    );
    for index in 0..3 {
        assert_eq!(job["hosts"][index]["data"], "finished\n");
    }
    assert_eq!(job["hosts"][3]["retcode"], code(Code::HostNoAnswer));
    assert_eq!(job["hosts"][4]["retcode"], code(Code::NoSuchHost));
    // The offline host's queue job was taken back, so no agent runs it late (an empty,
    // unwatched tube ceases to exist).
    let stats = queue.stats_tube("host.offline").map(|s| s.get_u64("current-jobs-ready"));
    assert!(matches!(stats, Ok(Some(0)) | Err(client::Error::NotFound)), "{stats:?}");
    let replies = queue.stats_tube(wire::DEFAULT_REPLY_TUBE).expect("reply tube");
    assert_eq!(replies.get_u64("current-jobs-ready"), Some(0));
}

/// Bad requests answer 400 with a JSON body naming the field and a validation code.
#[test]
fn validation_errors_name_the_field() {
    let cluster = Cluster::start(&["alpha", "beta", "gamma"]);
    let url = cluster.url("/v1/jobs");
    let big_cmd = "x".repeat(polaris_dispatch::request::MAX_CMD_BYTES + 1);
    let cases: Vec<(String, Code, Value)> = vec![
        ("{\"hosts\": [".into(), Code::MalformedJson, Value::Null),
        (r#"{"hosts": [], "method": "sync.bash", "cmd": "ls"}"#.into(), Code::EmptyHosts, json!("hosts")),
        (r#"{"hosts": "alpha", "method": "sync.bash", "cmd": "ls"}"#.into(), Code::WrongType, json!("hosts")),
        (r#"{"hosts": ["alpha"], "method": "sync.ruby", "cmd": "ls"}"#.into(), Code::UnknownMethod, json!("method")),
        (
            r#"{"hosts": ["alpha"], "method": "sync.bash", "cmd": "ls", "timeout": "30"}"#.into(),
            Code::WrongType,
            json!("timeout"),
        ),
        (
            json!({"hosts": ["alpha"], "method": "sync.bash", "cmd": big_cmd}).to_string(),
            Code::CmdTooLarge,
            json!("cmd"),
        ),
    ];
    for (body, expected, field) in cases {
        let (status, reply) = request("POST", &url, Some(&body), None);
        assert_eq!(status, 400, "{reply}");
        assert_eq!(reply["error"]["code"], code(expected), "{reply}");
        assert_eq!(reply["error"]["hex"], expected.hex());
        assert_eq!(reply["error"]["type"], "validation");
        assert_eq!(reply["error"]["field"], field, "{reply}");
    }
    let (status, reply) = get(&cluster.url("/v1/jobs/00000000-0000-4000-8000-000000000000"));
    assert_eq!((status, reply["error"]["code"].clone()), (404, code(Code::NoSuchJob)));
}

/// Envelopes with a bad signature, past their expiry or with a method the agent does not
/// know are buried, never run, and reported as failed on the reply tube they name.
#[test]
fn forged_or_expired_envelopes_are_buried_not_run() {
    let cluster = Cluster::start(&["alpha", "beta", "gamma"]);
    let marker = cluster.dir.path().join("pwned");
    let mut queue = queue_client(&cluster.queue);
    let reply_tube = "forged.replies";
    let envelope = |job_id: &str, expires_at: u64| JobEnvelope {
        v: 1,
        job_id: job_id.to_string(),
        host: "alpha".into(),
        method: Method::SyncBash,
        cmd: format!("touch {}", marker.display()),
        timeout: 5,
        reply_tube: reply_tube.into(),
        issued_at: wire::unix_now(),
        expires_at,
        kill_grace_ms: None,
        attempt: None,
        memory_max: None,
        cpu_max_milli: None,
        args: None,
    };
    let forged_secret = Secret::new(b"not-the-real-secret-at-all".to_vec()).expect("secret");
    let forged =
        wire::sign(&forged_secret, &serde_json::to_vec(&envelope("forged", wire::unix_now() + 60)).expect("json"));
    let stale =
        wire::sign(&test_secret(), &serde_json::to_vec(&envelope("stale", wire::unix_now() - 10)).expect("json"));
    queue.use_tube("host.alpha").expect("use");
    queue.put(0, 0, 60, &forged).expect("put forged");
    queue.put(0, 0, 60, &stale).expect("put stale");
    let mut newer = serde_json::to_value(envelope("newer", wire::unix_now() + 60)).expect("json");
    newer["method"] = json!("sync.python");
    let newer = wire::sign(&test_secret(), newer.to_string().as_bytes());
    queue.put(0, 0, 60, &newer).expect("put unsupported method");

    let mut replies = queue_client(&cluster.queue);
    replies.watch(reply_tube).expect("watch");
    replies.ignore("default").expect("ignore");
    let mut seen = Vec::new();
    for _ in 0..3 {
        let job = replies.reserve_with_timeout(10).expect("reserve").expect("a refusal report");
        let payload = wire::open(&test_secret(), &job.body).expect("reports are signed by the agent");
        let result: HostResult = serde_json::from_slice(payload).expect("result JSON");
        assert_eq!(result.resp, Resp::Failed);
        assert_eq!(result.host, "alpha");
        seen.push((result.job_id, result.retcode));
        replies.delete(job.id).expect("delete");
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            ("forged".to_string(), u32::from(Code::BadSignature.value())),
            ("newer".to_string(), u32::from(Code::UnsupportedMethod.value())),
            ("stale".to_string(), u32::from(Code::EnvelopeExpired.value())),
        ]
    );
    let stats = queue.stats_tube("host.alpha").expect("stats");
    assert_eq!(stats.get_u64("current-jobs-buried"), Some(3));
    assert!(!marker.exists(), "a refused envelope ran its command");
}

/// With `--tokens`, requests need a bearer token and commands must match its allow-list.
#[test]
fn tokens_enforce_command_allow_lists() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tokens = dir.path().join("tokens.json");
    std::fs::write(
        &tokens,
        json!({"tokens": [
            {"name": "ops", "token": "ops-token-0123456789", "methods": ["sync.bash", "sync.query"], "commands": ["echo *", "uptime"]},
            {"name": "agents", "token": "agent-token-0123456789", "methods": [], "manage_hosts": true}
        ]})
        .to_string(),
    )
    .expect("write tokens");
    let tokens_arg = tokens.to_str().expect("utf-8 path");
    let cluster = Cluster::start_with(
        &["alpha", "beta", "gamma"],
        BIG_JOB_SIZE,
        &["--tokens", tokens_arg],
        &[("POLARIS_TOKEN", "agent-token-0123456789")],
    );
    let url = cluster.url("/v1/jobs");
    let job = |cmd: &str| json!({"hosts": ["alpha"], "method": "sync.bash", "cmd": cmd}).to_string();
    let ops = Some("ops-token-0123456789");

    let (status, reply) = request("POST", &url, Some(&job("echo hi")), None);
    assert_eq!((status, reply["error"]["code"].clone()), (401, code(Code::MissingToken)));
    let (status, reply) = request("POST", &url, Some(&job("echo hi")), Some("wrong-token-0123456789"));
    assert_eq!((status, reply["error"]["code"].clone()), (401, code(Code::InvalidToken)));
    let (status, reply) = request("POST", &url, Some(&job("echo hi")), ops);
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["response"][0]["data"], "hi\n");
    for denied in ["echo hi; id", "echo $(id)", "id"] {
        let (status, reply) = request("POST", &url, Some(&job(denied)), ops);
        assert_eq!((status, reply["error"]["code"].clone()), (403, code(Code::CommandNotAllowed)), "{denied}");
        assert_eq!(reply["error"]["field"], "cmd");
    }
    let async_job = json!({"hosts": ["alpha"], "method": "async.bash", "cmd": "echo hi"}).to_string();
    let (status, reply) = request("POST", &url, Some(&async_job), ops);
    assert_eq!((status, reply["error"]["code"].clone()), (403, code(Code::OperationNotAllowed)));
    let (status, reply) = request("POST", &cluster.url("/v1/hosts"), Some(r#"{"id": "rogue"}"#), ops);
    assert_eq!((status, reply["error"]["code"].clone()), (403, code(Code::OperationNotAllowed)));
    let (status, reply) = request("GET", &cluster.url("/v1/hosts"), None, ops);
    assert_eq!(status, 200, "{reply}");
}

/// DELETE revokes host jobs that no agent has taken (the queue job is gone) and has the
/// running ones cancelled by their agents.
#[test]
fn revoke_removes_jobs_no_agent_took_and_cancels_running_ones() {
    let cluster = Cluster::start(&["alpha", "beta", "gamma"]);
    let (status, _) = post(&cluster.url("/v1/hosts"), &json!({"id": "offline"}));
    assert_eq!(status, 201);
    let (status, body) = post(
        &cluster.url("/v1/jobs"),
        &json!({"hosts": ["offline", "alpha"], "method": "async.bash", "cmd": "echo started; touch started; sleep 5; echo ran", "timeout": 30}),
    );
    assert_eq!(status, 202);
    let url = cluster.url(&format!("/v1/jobs/{}", body["id"].as_str().expect("id")));
    wait_until(Duration::from_secs(5), "offline host queued and alpha running", || {
        let states = host_states(&get(&url).1);
        states[0].1 == "ready" && states[1].1 == "reserved"
    });
    // Its first line is out (the pipe holds it however soon the kill comes).
    wait_until(Duration::from_secs(10), "alpha printed its first line", || {
        cluster.workdir("alpha").join("started").exists()
    });
    let (status, reply) = request("DELETE", &url, None, None);
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        reply["hosts"],
        json!([{"host": "offline", "state": "revoked"}, {"host": "alpha", "state": "reserved"}])
    );
    wait_until(Duration::from_secs(10), "alpha cancelled", || get(&url).1["done"] == true);
    let job = get(&url).1;
    assert_eq!(job["hosts"][0]["retcode"], code(Code::Revoked));
    assert_eq!(job["hosts"][1]["state"], "cancelled", "{job}");
    assert_eq!(job["hosts"][1]["retcode"], code(Code::Cancelled), "{job}");
    assert_eq!(job["hosts"][1]["data"], "started\n", "the output so far is kept: {job}");
    let stats = queue_client(&cluster.queue).stats_tube("host.offline").map(|s| s.get_u64("current-jobs-ready"));
    assert!(matches!(stats, Ok(Some(0)) | Err(client::Error::NotFound)), "{stats:?}");
}

/// SIGTERM to an agent with a running command: it stops reserving, lets the command finish,
/// reports it and exits 0.
#[test]
fn agent_sigterm_finishes_the_running_job() {
    let mut cluster = Cluster::start(&["alpha", "beta", "gamma"]);
    let (status, body) = post(
        &cluster.url("/v1/jobs"),
        &json!({"hosts": ["alpha"], "method": "async.bash", "cmd": "sleep 1; echo finished", "timeout": 20}),
    );
    assert_eq!(status, 202);
    let url = cluster.url(&format!("/v1/jobs/{}", body["id"].as_str().expect("id")));
    wait_until(Duration::from_secs(5), "alpha took the job", || host_states(&get(&url).1)[0].1 == "reserved");
    let agent = cluster.agent("alpha");
    agent.signal("TERM").expect("SIGTERM the agent");
    assert_eq!(agent.wait_exit(Duration::from_secs(10)), Some(true), "agent exits cleanly after the job");
    wait_until(Duration::from_secs(5), "result recorded", || get(&url).1["done"] == true);
    let job = get(&url).1;
    assert_eq!(job["hosts"][0]["state"], "success");
    assert_eq!(job["hosts"][0]["data"], "finished\n");
}

/// The client against the real queue: the commands the dispatcher and agent rely on.
#[test]
fn client_speaks_the_protocol() {
    let queue = start_queue(1024);
    let mut c = queue_client(&queue);
    c.use_tube("t.one").expect("use");
    assert_eq!(c.watch("t.one").expect("watch"), 2);
    assert_eq!(c.ignore("default").expect("ignore"), 1);
    assert!(matches!(c.ignore("t.one"), Err(client::Error::NotIgnored)));
    let id = c.put(5, 0, 30, b"hello\r\nworld").expect("put");
    assert_eq!(c.peek(id).expect("peek").body, b"hello\r\nworld");
    assert_eq!(c.peek_ready().expect("peek-ready").map(|j| j.id), Some(id));
    let job = c.reserve_with_timeout(1).expect("reserve").expect("a job");
    assert_eq!((job.id, job.body.as_slice()), (id, &b"hello\r\nworld"[..]));
    assert_eq!(c.stats_job(id).expect("stats-job").get("state"), Some("reserved"));
    c.touch(id).expect("touch");
    c.bury(id, 1).expect("bury");
    assert_eq!(c.peek_buried().expect("peek-buried").map(|j| j.id), Some(id));
    assert_eq!(c.kick(10).expect("kick"), 1);
    let job = c.reserve().expect("reserve");
    c.release(job.id, 1, 0).expect("release");
    let job = c.reserve_with_timeout(0).expect("reserve").expect("a job");
    c.delete(job.id).expect("delete");
    assert!(matches!(c.delete(job.id), Err(client::Error::NotFound)));
    assert_eq!(c.reserve_with_timeout(0).expect("reserve"), None);
    assert!(matches!(c.put(0, 0, 1, &[b'x'; 2048]), Err(client::Error::JobTooBig)));
    assert!(matches!(c.use_tube("bad name"), Err(client::Error::InvalidTubeName(_))));
    let delayed = c.put(0, 100, 1, b"later").expect("put delayed");
    assert_eq!(c.peek_delayed().expect("peek-delayed").map(|j| j.id), Some(delayed));
    c.kick_job(delayed).expect("kick-job");
    assert_eq!(c.stats_tube("t.one").expect("stats-tube").get_u64("current-jobs-ready"), Some(1));
    assert_eq!(c.stats().expect("stats").get_u64("max-job-size"), Some(1024));
    if std::env::var("POLARIS_TEST_QUEUE").as_deref() == Ok("beanstalkd") {
        assert!(matches!(c.revoke(delayed), Err(client::Error::UnknownCommand)));
    } else {
        let held = c.reserve_with_timeout(0).expect("reserve").expect("a job");
        assert!(matches!(c.revoke(held.id), Ok(client::RevokeOutcome::Reserved)));
        c.release(held.id, 0, 100).expect("release");
        assert!(matches!(c.revoke(held.id), Ok(client::RevokeOutcome::Revoked)));
        assert!(matches!(c.revoke(held.id), Err(client::Error::NotFound)));
    }
}

/// An agent that believes the queue takes bigger jobs than it does gets JOB_TOO_BIG for
/// its result, cuts the output and puts it again: the result is not lost.
#[test]
fn result_put_recovers_from_job_too_big() {
    let queue = start_queue(20_000);
    let mut conn = queue_client(&queue);
    let result = HostResult {
        v: 1,
        job_id: "j".into(),
        host: "alpha".into(),
        resp: Resp::Success,
        retcode: 0,
        message: "Normal termination".into(),
        data: "\"quoted\"\n".repeat(6000),
        encoding: None,
        truncated: false,
        output_bytes: 60_000,
        attempt: None,
    };
    // usize::MAX: the agent has not learnt the real limit, so the first put is refused.
    polaris_agent::put_result(&mut conn, &test_secret(), "results.small", result, usize::MAX)
        .expect("put after cutting");
    conn.watch("results.small").expect("watch");
    let job = conn.reserve_with_timeout(1).expect("reserve").expect("the result is there");
    assert!(job.body.len() <= 20_000);
    let stored: HostResult =
        serde_json::from_slice(wire::open(&test_secret(), &job.body).expect("signed")).expect("json");
    assert!(stored.truncated);
    assert!(stored.data.len() > 10_000 && stored.data.len() < 20_000, "{}", stored.data.len());
    assert!(stored.message.starts_with("Normal termination; output cut to "), "{}", stored.message);
}

/// A command that runs longer than its queue job's TTR keeps the job reserved because the
/// agent touches it; the job never times out back to ready and runs once.
#[test]
fn long_command_is_touched_past_its_ttr() {
    let cluster = Cluster::start(&["alpha", "beta", "gamma"]);
    let mut queue = queue_client(&cluster.queue);
    let envelope = JobEnvelope {
        v: 1,
        job_id: "long".into(),
        host: "alpha".into(),
        method: Method::SyncBash,
        cmd: "sleep 4; echo ok".into(),
        timeout: 20,
        reply_tube: "touch.replies".into(),
        issued_at: wire::unix_now(),
        expires_at: wire::unix_now() + 60,
        kill_grace_ms: None,
        attempt: None,
        memory_max: None,
        cpu_max_milli: None,
        args: None,
    };
    let body = wire::sign(&test_secret(), &serde_json::to_vec(&envelope).expect("json"));
    queue.use_tube("host.alpha").expect("use");
    let queue_id = queue.put(0, 0, 2, &body).expect("put with a 2 s TTR");
    std::thread::sleep(Duration::from_millis(3500));
    let stats = queue.stats_job(queue_id).expect("job still exists");
    assert_eq!(stats.get("state"), Some("reserved"));
    assert_eq!(stats.get_u64("timeouts"), Some(0), "the TTR ran out: {stats:?}");
    queue.watch("touch.replies").expect("watch");
    queue.ignore("default").expect("ignore");
    let job = queue.reserve_with_timeout(10).expect("reserve").expect("a result");
    let result: HostResult =
        serde_json::from_slice(wire::open(&test_secret(), &job.body).expect("signed")).expect("json");
    assert_eq!((result.resp, result.data.as_str()), (Resp::Success, "ok\n"));
    // The agent deletes its job right after putting the result.
    wait_until(Duration::from_secs(2), "the agent deleted the job", || {
        matches!(queue.stats_job(queue_id), Err(client::Error::NotFound))
    });
}

/// While the queue is down, a new job waits as `pending` in the dispatcher's database; when
/// the queue is back the job is queued, run and recorded.
#[test]
fn queue_outage_delays_jobs_but_loses_none() {
    let mut cluster = Cluster::start(&["alpha", "beta", "gamma"]);
    cluster.stop_queue();
    let (status, body) = post(
        &cluster.url("/v1/jobs"),
        &json!({"hosts": ["alpha", "beta"], "method": "async.bash", "cmd": "echo back", "timeout": 30}),
    );
    assert_eq!(status, 202, "{body}");
    let url = cluster.url(&format!("/v1/jobs/{}", body["id"].as_str().expect("id")));
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(
        host_states(&get(&url).1),
        [("alpha", "pending"), ("beta", "pending")].map(|(h, s)| (h.to_string(), s.to_string()))
    );
    cluster.restart_queue();
    wait_until(Duration::from_secs(15), "job done after the queue came back", || get(&url).1["done"] == true);
    let job = get(&url).1;
    for index in 0..2 {
        assert_eq!(job["hosts"][index]["state"], "success", "{job}");
        assert_eq!(job["hosts"][index]["data"], "back\n");
    }
}

/// A host job nobody takes expires in time, even while the dispatcher is down:
/// on polarisd the queue drops it at its start deadline (the put carries a TTL),
/// and the dispatcher, back up, reads `job-state` and reports `expired` at once
/// instead of assuming an agent took it. On beanstalkd the dispatcher deletes
/// the job itself; the outcome is the same.
#[test]
fn unanswered_job_expires_even_across_a_dispatcher_restart() {
    let mut cluster = Cluster::start(&["alpha"]);
    cluster.agent("alpha").kill();
    let (status, body) = post(
        &cluster.url("/v1/jobs"),
        &json!({"hosts": ["alpha"], "method": "async.bash", "cmd": "echo never", "timeout": 2}),
    );
    assert_eq!(status, 202, "{body}");
    let path = format!("/v1/jobs/{}", body["id"].as_str().expect("id"));
    let url = cluster.url(&path);
    wait_until(Duration::from_secs(5), "the host job is queued", || host_states(&get(&url).1)[0].1 == "ready");
    cluster.crash_dispatcher();
    std::thread::sleep(Duration::from_millis(3500));
    cluster.restart_dispatcher();
    let restarted = Instant::now();
    // The new dispatcher listens on a new port.
    let url = cluster.url(&path);
    wait_until(Duration::from_secs(10), "the host job expired", || host_states(&get(&url).1)[0].1 == "expired");
    assert!(restarted.elapsed() < Duration::from_secs(8), "reported expired well before the result grace period");
    let job = get(&url).1;
    assert_eq!(job["hosts"][0]["retcode"], code(Code::HostNoAnswer), "{job}");
    if std::env::var("POLARIS_TEST_QUEUE").as_deref() != Ok("beanstalkd") {
        let mut c = Client::connect(&cluster.queue.addr, Duration::from_secs(2)).expect("queue");
        let stats = c.polaris_stats().expect("polaris-stats");
        assert_eq!(stats.get_u64("jobs-expired"), Some(1), "the queue's TTL dropped the job");
    }
}

/// `--allow-client` keeps every other address out, before anything else.
#[test]
fn clients_outside_the_allow_list_are_refused() {
    let queue = start_queue(BIG_JOB_SIZE);
    let dir = tempfile::tempdir().expect("tempdir");
    let refused = start_dispatcher(
        &queue.addr,
        &dir.path().join("a"),
        &["--allow-client", "10.0.0.0/8", "--allow-client", "::1"],
    );
    let (status, body) = get(&format!("{}/v1/hosts", refused.url));
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], code(Code::ClientNotAllowed), "{body}");
    let allowed = start_dispatcher(&queue.addr, &dir.path().join("b"), &["--allow-client", "127.0.0.0/8"]);
    let (status, body) = get(&format!("{}/v1/hosts", allowed.url));
    assert_eq!(status, 200, "{body}");
}

// ---------------------------------------------------------------------------------------
// A gate in front of the queue, for tests that must hold the dispatcher's queue traffic at
// a chosen point.

/// A TCP proxy between the dispatcher and the queue. Open, it forwards everything; told to
/// let `n` more puts through, it forwards client-to-server traffic until `n` commands
/// starting with `put ` have passed and then holds all of it, on every connection, until
/// it is opened again. Server-to-client traffic always flows, so the last put let through
/// gets its reply.
struct QueueGate {
    addr: String,
    shared: std::sync::Arc<GateShared>,
}

struct GateShared {
    /// `None`: open; `Some(n)`: `n` more puts may pass, then everything is held.
    puts_left: std::sync::Mutex<Option<usize>>,
    changed: std::sync::Condvar,
}

impl GateShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<usize>> {
        self.puts_left.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Blocks until `chunk` (one client command, as the blocking client writes each
    /// command with one call and waits for its reply) may be forwarded.
    fn pass(&self, chunk: &[u8]) {
        let mut state = self.lock();
        loop {
            match *state {
                None => return,
                Some(0) => state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner()),
                Some(n) => {
                    if chunk.starts_with(b"put ") {
                        *state = Some(n - 1);
                    }
                    return;
                }
            }
        }
    }
}

impl QueueGate {
    fn start(upstream: &str) -> QueueGate {
        use std::io::{Read, Write};
        use std::net::{Shutdown, TcpListener, TcpStream};
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the gate");
        let addr = listener.local_addr().expect("gate address").to_string();
        let shared = std::sync::Arc::new(GateShared {
            puts_left: std::sync::Mutex::new(None),
            changed: std::sync::Condvar::new(),
        });
        let upstream = upstream.to_string();
        let gate_shared = shared.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(&upstream) else { continue };
                let (mut client_in, mut server_out) = (client, server);
                let (Ok(mut client_out), Ok(mut server_in)) = (client_in.try_clone(), server_out.try_clone()) else {
                    continue;
                };
                let shared = gate_shared.clone();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 256 * 1024];
                    loop {
                        match client_in.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                shared.pass(&buf[..n]);
                                if server_out.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = server_out.shutdown(Shutdown::Both);
                    let _ = client_in.shutdown(Shutdown::Both);
                });
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut server_in, &mut client_out);
                    let _ = client_out.shutdown(Shutdown::Both);
                    let _ = server_in.shutdown(Shutdown::Both);
                });
            }
        });
        QueueGate { addr, shared }
    }

    /// Lets `n` more puts through, then holds everything.
    fn let_through_puts(&self, n: usize) {
        *self.shared.lock() = Some(n);
        self.shared.changed.notify_all();
    }

    /// Holds all client-to-server traffic from now on.
    fn hold(&self) {
        self.let_through_puts(0);
    }

    /// Forwards everything again, held commands first.
    fn open(&self) {
        *self.shared.lock() = None;
        self.shared.changed.notify_all();
    }
}

fn envelope_of(job: &client::Job) -> JobEnvelope {
    serde_json::from_slice(wire::open(&test_secret(), &job.body).expect("a signed envelope")).expect("envelope JSON")
}

fn host_state(job: &Value, index: usize) -> String {
    job["hosts"][index]["state"].as_str().unwrap_or("").to_string()
}

/// An in-memory queue restarts and hands the dispatcher's old queue job ids to somebody
/// else's jobs. Neither `DELETE /v1/jobs/{id}` nor the deadline sweeper may delete them:
/// the dispatcher acts on a queue id only with proof that it is still its envelope, and
/// puts the work it lost with the old queue on the new one.
#[test]
fn queue_restart_never_lets_the_dispatcher_delete_a_strangers_job() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut queue = start_queue(BIG_JOB_SIZE);
    let gate = QueueGate::start(&queue.addr);
    let dispatch = start_dispatcher(&gate.addr, &dir.path().join("data"), &[]);
    let url = |path: &str| format!("{}{path}", dispatch.url);
    // A registered host whose agent is not running: its jobs sit in the queue.
    let (status, _) = post(&url("/v1/hosts"), &json!({"id": "alpha"}));
    assert_eq!(status, 201);
    let job =
        |cmd: &str, timeout: u32| json!({"hosts": ["alpha"], "method": "async.bash", "cmd": cmd, "timeout": timeout});
    let (status, body) = post(&url("/v1/jobs"), &job("echo to-cancel", 60));
    assert_eq!(status, 202, "{body}");
    let cancelled = body["id"].as_str().expect("id").to_string();
    let (status, body) = post(&url("/v1/jobs"), &job("echo to-expire", 4));
    assert_eq!(status, 202, "{body}");
    let expiring = body["id"].as_str().expect("id").to_string();
    let job_url = |id: &str| url(&format!("/v1/jobs/{id}"));
    wait_until(Duration::from_secs(10), "both host jobs on the queue", || {
        host_state(&get(&job_url(&cancelled)).1, 0) == "ready" && host_state(&get(&job_url(&expiring)).1, 0) == "ready"
    });
    let mut direct = queue_client(&queue);
    let old_ids: Vec<u64> = [&cancelled, &expiring]
        .iter()
        .map(|id| {
            (1..=2)
                .find(|q| envelope_of(&direct.peek(*q).expect("peek")).job_id == **id)
                .expect("the job's envelope in the old queue")
        })
        .collect();

    // The queue restarts empty while the dispatcher cannot reach it, and a stranger's
    // jobs on another tube get the old ids.
    gate.hold();
    let port: u16 = queue.addr.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port");
    queue.proc.kill();
    queue = start_queue_on_port(BIG_JOB_SIZE, Some(port));
    let mut direct = queue_client(&queue);
    direct.use_tube("other.work").expect("use");
    let strangers: Vec<u64> =
        (0..2).map(|i| direct.put(0, 0, 600, format!("stranger {i}").as_bytes()).expect("put")).collect();
    let mut sorted_old = old_ids.clone();
    sorted_old.sort_unstable();
    assert_eq!(strangers, sorted_old, "precondition: the new queue reuses the old ids");
    gate.open();
    // The dispatcher notices the new queue and puts the envelopes it lost there again.
    wait_until(Duration::from_secs(10), "both envelopes put again on the new queue", || {
        direct.stats_tube("host.alpha").map(|s| s.get_u64("current-jobs-ready") == Some(2)).unwrap_or(false)
    });

    // Cancel the first job (the queue connections the dispatcher held died with the old
    // queue, so an attempt may find the queue unavailable; ask again until it is final).
    wait_until(Duration::from_secs(15), "the cancelled job final", || {
        let (status, reply) = request("DELETE", &job_url(&cancelled), None, None);
        status == 200 && !["pending", "ready"].contains(&reply["hosts"][0]["state"].as_str().unwrap_or(""))
    });
    // The second one passes its deadline and meets the sweeper.
    wait_until(Duration::from_secs(20), "the second job expired", || get(&job_url(&expiring)).1["done"] == true);

    for (id, body) in strangers.iter().zip(["stranger 0", "stranger 1"]) {
        let found = direct.peek(*id).unwrap_or_else(|e| panic!("the stranger's job {id} is gone: {e}"));
        assert_eq!(found.body, body.as_bytes());
        assert_eq!(direct.stats_job(*id).expect("stats-job").get("tube"), Some("other.work"));
    }
    let (_, cancelled_job) = get(&job_url(&cancelled));
    assert_eq!(host_state(&cancelled_job, 0), "revoked", "{cancelled_job}");
    let (_, expired_job) = get(&job_url(&expiring));
    assert_eq!(host_state(&expired_job, 0), "expired", "{expired_job}");
    assert_eq!(expired_job["hosts"][0]["retcode"], code(Code::HostNoAnswer));
    // Whatever the dispatcher put on the new queue for them was taken back.
    let stats = direct.stats_tube("host.alpha").map(|s| s.get_u64("current-jobs-ready"));
    assert!(matches!(stats, Ok(Some(0)) | Err(client::Error::NotFound)), "{stats:?}");
}

impl QueueGate {
    /// Whether traffic is held now.
    fn holding(&self) -> bool {
        *self.shared.lock() == Some(0)
    }
}

/// Cancelling a job of thousands of hosts while the enqueuer is still putting its
/// envelopes: the job's pending hosts are revoked in the database at once, before any
/// queue round trip, so other calls see it while the queue is still held (and the
/// revocations of the envelopes already put cannot finish); the enqueuer stops putting;
/// afterwards nothing of the job is left on the queue.
#[test]
fn cancelling_a_large_job_mid_enqueue_revokes_at_once_without_blocking_others() {
    const HOSTS: usize = 2000;
    const LET_THROUGH: usize = 250;
    let dir = tempfile::tempdir().expect("tempdir");
    let queue = start_queue(BIG_JOB_SIZE);
    let gate = QueueGate::start(&queue.addr);
    let dispatch = start_dispatcher(&gate.addr, &dir.path().join("data"), &[]);
    let url = |path: &str| format!("{}{path}", dispatch.url);
    let hosts: Vec<String> = (0..HOSTS).map(|i| format!("fake-{i:04}")).collect();
    for host in &hosts {
        let (status, body) = post(&url("/v1/hosts"), &json!({"id": host}));
        assert_eq!(status, 201, "{body}");
    }
    gate.let_through_puts(LET_THROUGH);
    let (status, body) =
        post(&url("/v1/jobs"), &json!({"hosts": hosts, "method": "async.bash", "cmd": "echo never", "timeout": 600}));
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().expect("id").to_string();
    wait_until(Duration::from_secs(30), "the enqueuer held after its first puts", || gate.holding());
    let list_url = url("/v1/jobs?limit=1");
    let count = |page: &Value, state: &str| page["jobs"][0]["states"][state].as_u64().unwrap_or(0);
    // The enqueuer records what it put in batches smaller than LET_THROUGH, so some host
    // jobs are `ready` on the queue now: the cancel must take those back through the queue.
    wait_until(Duration::from_secs(10), "some host jobs recorded as ready", || count(&get(&list_url).1, "ready") > 0);

    let job_url = url(&format!("/v1/jobs/{id}"));
    let deleter = {
        let job_url = job_url.clone();
        std::thread::spawn(move || request("DELETE", &job_url, None, None))
    };
    // While the queue is held, other calls answer and already see the job's pending hosts
    // revoked.
    wait_until(Duration::from_secs(20), "pending hosts revoked while the queue is held", || {
        let (status, page) = get(&list_url);
        assert_eq!(status, 200, "{page}");
        count(&page, "revoked") >= (HOSTS - LET_THROUGH) as u64
    });
    // This GET answered before the revocations finished: those need the held queue.
    assert!(count(&get(&list_url).1, "ready") > 0);
    assert!(!deleter.is_finished(), "the DELETE took back envelopes without the queue");
    let (status, host) = get(&url("/v1/hosts/fake-0001"));
    assert_eq!(status, 200, "{host}");
    assert!(gate.holding(), "nothing opened the gate");
    gate.open();

    let (status, reply) = deleter.join().expect("the DELETE thread");
    assert_eq!(status, 200, "{reply}");
    let states = reply["hosts"].as_array().expect("hosts");
    assert_eq!(states.len(), HOSTS);
    assert!(states.iter().all(|h| h["state"] == "revoked"), "{reply}");
    let mut direct = queue_client(&queue);
    wait_until(Duration::from_secs(20), "nothing of the job left on the queue", || {
        let stats = direct.stats().expect("stats");
        ["current-jobs-ready", "current-jobs-delayed", "current-jobs-reserved", "current-jobs-buried"]
            .iter()
            .all(|k| stats.get_u64(k) == Some(0))
    });
    // One put may have been in flight when the cancel came; no more followed it.
    let puts = direct.stats().expect("stats").get_u64("cmd-put").expect("cmd-put");
    assert!(puts <= (LET_THROUGH + 1) as u64, "the enqueuer kept putting after the cancel: {puts} puts");
    let (status, job) = get(&job_url);
    assert_eq!(status, 200);
    assert_eq!(job["done"], true);
    assert!(
        job["cancelled_at_ms"].as_i64().is_some_and(|ms| ms >= job["created_at_ms"].as_i64().unwrap_or(i64::MAX)),
        "{}",
        job["cancelled_at_ms"]
    );
    assert!(job["hosts"].as_array().expect("hosts").iter().all(|h| h["retcode"] == code(Code::Revoked)), "{job}");
}

/// Every error, also for paths, methods and query parameters the API does not have, is
/// answered in the documented JSON shape with a code.
#[test]
fn every_error_has_the_documented_shape() {
    let queue = start_queue(BIG_JOB_SIZE);
    let dir = tempfile::tempdir().expect("tempdir");
    let dispatch = start_dispatcher(&queue.addr, &dir.path().join("data"), &[]);
    let url = |path: &str| format!("{}{path}", dispatch.url);
    let check = |method: &str, path: &str, body: Option<&str>, status: u16, name: &str, field: Value| {
        let (got, text) = request_text(method, &url(path), body, None);
        let reply: Value =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("{method} {path}: not JSON: {text:?}"));
        assert_eq!(got, status, "{method} {path}: {reply}");
        let error = reply["error"].as_object().unwrap_or_else(|| panic!("{method} {path}: {reply}"));
        let keys: Vec<&str> = error.keys().map(String::as_str).collect();
        assert_eq!(keys.len(), 6, "{method} {path}: {reply}");
        for key in ["code", "hex", "type", "name", "field", "message"] {
            assert!(error.contains_key(key), "{method} {path}: {key} missing in {reply}");
        }
        assert_eq!(error["name"], name, "{method} {path}: {reply}");
        let code = Code::ALL.iter().find(|c| c.label() == name).unwrap_or_else(|| panic!("no code named {name}"));
        assert_eq!(error["code"], json!(code.value()));
        assert_eq!(error["hex"], code.hex());
        assert_eq!(error["type"], "validation");
        assert_eq!(code.http_status(), status);
        assert_eq!(error["field"], field, "{method} {path}: {reply}");
        reply
    };
    // Unknown paths.
    check("GET", "/v1/nope", None, 404, "no_such_endpoint", Value::Null);
    check("GET", "/index.php", None, 404, "no_such_endpoint", Value::Null);
    check("POST", "/v1/jobs/x/y", Some("{}"), 404, "no_such_endpoint", Value::Null);
    // Known paths, wrong methods.
    check("PUT", "/v1/jobs", Some("{}"), 405, "method_not_allowed", Value::Null);
    check("POST", "/v1/jobs/00000000-0000-4000-8000-000000000000", Some("{}"), 405, "method_not_allowed", Value::Null);
    check("DELETE", "/v1/hosts", None, 405, "method_not_allowed", Value::Null);
    let allow = match ureq::request("POST", &url("/v1/hosts/alpha")).call() {
        Err(ureq::Error::Status(405, response)) => response.header("allow").unwrap_or("").to_string(),
        other => panic!("POST answered {other:?}"),
    };
    assert!(["GET", "DELETE", "PUT", "PATCH"].iter().all(|m| allow.contains(m)), "Allow: {allow:?}");
    // Unknown query parameters are refused like unknown body fields.
    let reply = check("GET", "/v1/jobs?lmit=5", None, 400, "unknown_field", json!("lmit"));
    assert!(reply["error"]["message"].as_str().unwrap_or("").contains("lmit"), "{reply}");
    check("GET", "/v1/jobs?limit=5&offset=0&verbose=1", None, 400, "unknown_field", json!("verbose"));
    check("GET", "/v1/hosts?all=1", None, 400, "unknown_field", json!("all"));
    check("GET", "/v1/jobs/00000000-0000-4000-8000-000000000000?x=1", None, 400, "unknown_field", json!("x"));
    let body = json!({"hosts": ["alpha"], "method": "async.bash", "cmd": "true"}).to_string();
    check("POST", "/v1/jobs?sync=1", Some(&body), 400, "unknown_field", json!("sync"));
    let (status, page) = get(&url("/v1/jobs?limit=5&offset=0"));
    assert_eq!(status, 200, "{page}");
    // A host id that can never be registered is invalid, not an unknown host.
    let bad_host = json!({"hosts": ["alpha", "web 01"], "method": "sync.bash", "cmd": "ls"}).to_string();
    let reply = check("POST", "/v1/jobs", Some(&bad_host), 400, "invalid_value", json!("hosts[1]"));
    assert!(reply["error"]["message"].as_str().unwrap_or("").contains("web 01"), "{reply}");
    let (status, page) = get(&url("/v1/jobs"));
    assert_eq!((status, page["total"].clone()), (200, json!(0)), "the refused job was not stored: {page}");
}

/// Starts an agent with its default kill grace (the cluster's agents use 0.5 s).
fn start_agent_with_default_kill_grace(
    queue_addr: &str,
    host: &str,
    dispatch_url: &str,
    dir: &std::path::Path,
) -> polaris_testkit::Proc {
    let workdir = dir.join(host);
    std::fs::create_dir_all(&workdir).expect("workdir");
    let child = std::process::Command::new(polaris_testkit::binary("polaris-agent"))
        .args(["--queue", queue_addr, "--host-id", host, "--dispatch", dispatch_url])
        .arg("--state-file")
        .arg(dir.join(format!("{host}.json")))
        .current_dir(&workdir)
        .env("POLARIS_SECRET", TEST_SECRET)
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("start polaris-agent");
    polaris_testkit::Proc::new(&format!("agent {host}"), child)
}

/// With the default agent kill grace (5 s) and the default sync grace (5 s), a command
/// that ignores SIGTERM is killed with SIGKILL 5 s after its timeout; the sync call waits
/// for that and reports the real outcome, not "no answer".
#[test]
fn sync_call_waits_for_the_agents_kill_path() {
    let queue = start_queue(BIG_JOB_SIZE);
    let dir = tempfile::tempdir().expect("tempdir");
    let dispatch = start_dispatcher(&queue.addr, &dir.path().join("data"), &[]);
    let _agent = start_agent_with_default_kill_grace(&queue.addr, "alpha", &dispatch.url, dir.path());
    wait_until(Duration::from_secs(15), "the agent registered", || {
        get(&format!("{}/v1/hosts/alpha", dispatch.url)).0 == 200
    });
    let (status, body) = post(
        &format!("{}/v1/jobs", dispatch.url),
        &json!({"hosts": ["alpha"], "method": "sync.bash", "cmd": "trap '' TERM; echo started; sleep 30", "timeout": 1}),
    );
    assert_eq!(status, 200, "{body}");
    let entry = &body["response"][0];
    assert_eq!(entry["retcode"], code(Code::ExecTimeout), "{body}");
    assert_eq!(entry["resp"], "failed");
    assert_eq!(entry["message"], "Timed out after 1s: process group killed with SIGKILL");
    assert_eq!(entry["data"], "started\n");
}

fn base64_decode(text: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(text).expect("valid base64")
}

/// Output that is not UTF-8 comes back byte for byte in `data_base64`; text output keeps
/// the seed shape; the 64 KiB cap cuts at a byte boundary and says so.
#[test]
fn binary_output_round_trips_exactly() {
    let cluster = Cluster::start(&["alpha"]);
    let workdir = cluster.workdir("alpha");
    let run = |cmd: &str| {
        let (status, body) =
            post(&cluster.url("/v1/jobs"), &json!({"hosts": ["alpha"], "method": "sync.bash", "cmd": cmd}));
        assert_eq!(status, 200, "{body}");
        body
    };

    let body = run("head -c 100 /dev/urandom | tee small.bin");
    let expected = std::fs::read(workdir.join("small.bin")).expect("small.bin");
    assert!(std::str::from_utf8(&expected).is_err(), "precondition: 100 random bytes are not UTF-8");
    let entry = &body["response"][0];
    assert_eq!(entry["resp"], "success", "{body}");
    assert_eq!(entry["message"], "Normal termination");
    assert_eq!(entry["data"], "");
    assert_eq!(entry["encoding"], "base64");
    assert_eq!(base64_decode(entry["data_base64"].as_str().expect("data_base64")), expected);
    let (_, job) = get(&cluster.url(&format!("/v1/jobs/{}", body["id"].as_str().expect("id"))));
    assert_eq!(job["hosts"][0]["encoding"], "base64", "{job}");
    assert_eq!(base64_decode(job["hosts"][0]["data_base64"].as_str().expect("data_base64")), expected);
    assert_eq!(job["hosts"][0]["truncated"], false);

    // Past the cap: exactly the first 65536 bytes, reported as truncated.
    let body = run("head -c 70000 /dev/urandom | tee big.bin");
    let expected = std::fs::read(workdir.join("big.bin")).expect("big.bin");
    let entry = &body["response"][0];
    assert_eq!(entry["message"], "Normal termination; output truncated to 65536 of 70000 bytes", "{entry}");
    assert_eq!(base64_decode(entry["data_base64"].as_str().expect("data_base64")), &expected[..65536]);
    let (_, job) = get(&cluster.url(&format!("/v1/jobs/{}", body["id"].as_str().expect("id"))));
    assert_eq!(job["hosts"][0]["truncated"], true);

    // Text cut by the cap in the middle of a character stays text: the whole characters
    // before the cut are kept and counted.
    let body = run("head -c 65535 /dev/zero | tr '\\0' a; printf '\\303\\251'");
    let entry = &body["response"][0];
    assert_eq!(
        entry["message"], "Normal termination; output truncated to 65535 of 65537 bytes",
        "{}",
        entry["message"]
    );
    let data = entry["data"].as_str().expect("data");
    assert_eq!(data.len(), 65535);
    assert!(data.bytes().all(|b| b == b'a'));
    assert!(entry.get("encoding").is_none() && entry.get("data_base64").is_none(), "{}", entry["message"]);

    // Text output keeps the seed's shape, without the new fields.
    let body = run("printf 'h\\303\\251llo\\n'");
    assert_eq!(
        body["response"][0],
        json!({"host": "alpha", "resp": "success", "retcode": 0, "message": "Normal termination", "data": "héllo\n"})
    );
}

/// A queue too small for a 64 KiB binary result: the agent cuts the base64 text at a
/// whole group of bytes, so the bytes kept are still exactly a prefix of the output.
#[test]
fn binary_output_cut_for_a_small_queue_stays_a_byte_prefix() {
    let cluster = Cluster::start_with(&["alpha"], 30_000, &[], &[]);
    let (status, body) = post(
        &cluster.url("/v1/jobs"),
        &json!({"hosts": ["alpha"], "method": "sync.bash", "cmd": "head -c 50000 /dev/urandom | tee out.bin"}),
    );
    assert_eq!(status, 200, "{body}");
    let expected = std::fs::read(cluster.workdir("alpha").join("out.bin")).expect("out.bin");
    let entry = &body["response"][0];
    assert_eq!(entry["resp"], "success", "{body}");
    let kept = base64_decode(entry["data_base64"].as_str().expect("data_base64"));
    assert!(kept.len() > 10_000 && kept.len() < 30_000, "kept {} bytes", kept.len());
    assert_eq!(kept, &expected[..kept.len()]);
    let message = entry["message"].as_str().expect("message");
    assert_eq!(
        message,
        format!("Normal termination; output cut to {} of 50000 bytes to fit the queue's max job size", kept.len())
    );
}

fn line_count(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path).map(|text| text.lines().count()).unwrap_or(0)
}

/// Kills (SIGKILL) the given processes when dropped, so a failing test leaves no command
/// behind.
struct KillOnDrop(Vec<i32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for pid in &self.0 {
            let _ = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status();
        }
    }
}

fn buried_on(queue: &mut Client, tube: &str) -> u64 {
    queue.stats_tube(tube).ok().and_then(|s| s.get_u64("current-jobs-buried")).unwrap_or(0)
}

/// Anyone who can reach the queue can copy a signed envelope and put it back. The agent
/// runs each envelope at most once, also after a restart: a copy is buried, not run,
/// reported as `envelope_replayed`, and never replaces the host's real result.
#[test]
fn replayed_envelope_runs_once_even_across_agent_restart() {
    let mut cluster = Cluster::start(&["alpha"]);
    let runs = cluster.dir.path().join("runs");
    let mut queue = queue_client(&cluster.queue);
    queue.use_tube("host.alpha").expect("use");

    // A dispatcher job, captured off the queue before the agent takes it.
    cluster.agent("alpha").kill();
    let cmd = format!("echo ran >> {}; echo hello", runs.display());
    let (status, body) =
        post(&cluster.url("/v1/jobs"), &json!({"hosts": ["alpha"], "method": "async.bash", "cmd": cmd, "timeout": 30}));
    assert_eq!(status, 202, "{body}");
    let url = cluster.url(&format!("/v1/jobs/{}", body["id"].as_str().expect("id")));
    wait_until(Duration::from_secs(5), "the envelope is on the queue", || host_states(&get(&url).1)[0].1 == "ready");
    let captured = queue.peek_ready().expect("peek-ready").expect("the envelope").body;
    cluster.respawn_agent("alpha", &[]);
    wait_until(Duration::from_secs(15), "the job done", || get(&url).1["done"] == true);
    let job = get(&url).1;
    assert_eq!(
        (job["hosts"][0]["state"].clone(), job["hosts"][0]["data"].clone()),
        (json!("success"), json!("hello\n"))
    );
    assert_eq!(line_count(&runs), 1);

    // Put back twice: once to the same agent, once after a restart.
    for round in 1..=2u64 {
        if round == 2 {
            cluster.respawn_agent("alpha", &[]);
        }
        queue.put(0, 0, 60, &captured).expect("put the copy");
        wait_until(Duration::from_secs(10), "the copy buried or run", || {
            buried_on(&mut queue, "host.alpha") == round || line_count(&runs) > 1
        });
        assert_eq!(line_count(&runs), 1, "round {round}: the replayed envelope ran its command again");
        assert_eq!(buried_on(&mut queue, "host.alpha"), round);
    }
    // The replay reports reached the dispatcher and were dropped: the real result stays.
    wait_until(Duration::from_secs(5), "the reply tube drained", || {
        queue.stats_tube(wire::DEFAULT_REPLY_TUBE).map(|s| s.get_u64("current-jobs-ready") == Some(0)).unwrap_or(false)
    });
    let job = get(&url).1;
    assert_eq!(job["hosts"][0]["state"], "success", "{job}");
    assert_eq!(job["hosts"][0]["retcode"], 0, "{job}");
    assert_eq!(job["hosts"][0]["data"], "hello\n", "{job}");

    // A signed envelope with a reply tube of our own shows the refusal's code.
    let envelope = JobEnvelope {
        v: 1,
        job_id: "replayed".into(),
        host: "alpha".into(),
        method: Method::SyncBash,
        cmd: format!("echo ran >> {}", runs.display()),
        timeout: 5,
        reply_tube: "replay.replies".into(),
        issued_at: wire::unix_now(),
        expires_at: wire::unix_now() + 60,
        kill_grace_ms: None,
        attempt: None,
        memory_max: None,
        cpu_max_milli: None,
        args: None,
    };
    let signed = wire::sign(&test_secret(), &serde_json::to_vec(&envelope).expect("json"));
    let mut replies = queue_client(&cluster.queue);
    replies.watch("replay.replies").expect("watch");
    replies.ignore("default").expect("ignore");
    let mut next_result = || {
        let job = replies.reserve_with_timeout(10).expect("reserve").expect("a result");
        replies.delete(job.id).expect("delete");
        serde_json::from_slice::<HostResult>(wire::open(&test_secret(), &job.body).expect("signed")).expect("json")
    };
    queue.put(0, 0, 60, &signed).expect("put");
    assert_eq!(next_result().resp, Resp::Success);
    for restart in [false, true] {
        if restart {
            cluster.respawn_agent("alpha", &[]);
        }
        queue.put(0, 0, 60, &signed).expect("put the copy");
        let refusal = next_result();
        assert_eq!((refusal.resp, refusal.retcode), (Resp::Failed, u32::from(Code::EnvelopeReplayed.value())));
        assert!(refusal.message.starts_with("Refused: this envelope already ran on this host"), "{}", refusal.message);
    }
    assert_eq!(line_count(&runs), 2, "each envelope ran exactly once");
    assert!(cluster.agent("alpha").try_exit_status().is_none(), "the agent died");
}

/// An agent killed with SIGKILL while its command runs leaves the command behind. The next
/// agent to start ends it (it is really the command's process group: same start time),
/// reports what happened, and does not run the job again.
#[test]
fn restarted_agent_ends_the_orphaned_command_and_does_not_rerun_it() {
    let mut cluster = Cluster::start(&["alpha"]);
    let runs = cluster.dir.path().join("runs");
    let pids = cluster.dir.path().join("pids");
    let cmd = format!(
        "echo run >> {r}; sleep 600 & echo $! > {p}.tmp; echo $$ >> {p}.tmp; mv {p}.tmp {p}; wait",
        r = runs.display(),
        p = pids.display()
    );
    let (status, body) =
        post(&cluster.url("/v1/jobs"), &json!({"hosts": ["alpha"], "method": "async.bash", "cmd": cmd, "timeout": 30}));
    assert_eq!(status, 202, "{body}");
    let url = cluster.url(&format!("/v1/jobs/{}", body["id"].as_str().expect("id")));
    wait_until(Duration::from_secs(10), "the command started", || pids.exists());
    let pids: Vec<i32> =
        std::fs::read_to_string(&pids).expect("pids").lines().map(|l| l.trim().parse().expect("pid")).collect();
    assert_eq!(pids.len(), 2);
    let _cleanup = KillOnDrop(pids.clone());

    cluster.agent("alpha").kill();
    std::thread::sleep(Duration::from_millis(500));
    for pid in &pids {
        assert!(!pid_gone(*pid), "process {pid} should outlive the killed agent");
    }
    cluster.respawn_agent("alpha", &[]);
    wait_until(Duration::from_secs(10), "the orphaned command ended", || pids.iter().all(|&pid| pid_gone(pid)));
    wait_until(Duration::from_secs(10), "the host reported", || get(&url).1["done"] == true);
    let job = get(&url).1;
    let host = &job["hosts"][0];
    assert_eq!(host["state"], "failed", "{job}");
    assert_eq!(host["retcode"], code(Code::AgentRestarted), "{job}");
    assert_eq!(host["message"], "Killed: the agent was restarted while the command ran", "{job}");
    // Not run again: the queue job is gone, and a moment later the command still ran once.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(line_count(&runs), 1, "the job ran again after the restart");
    let mut queue = queue_client(&cluster.queue);
    let stats = queue.stats_tube("host.alpha");
    let left = stats.as_ref().map(|s| (s.get_u64("current-jobs-ready"), s.get_u64("current-jobs-reserved")));
    assert!(matches!(left, Ok((Some(0), Some(0))) | Err(client::Error::NotFound)), "{left:?}");
    assert!(cluster.agent("alpha").try_exit_status().is_none(), "the agent died");
}

/// SIGTERM while a command runs past `--drain-timeout`: the agent kills it, reports that,
/// and exits; the job is not handed back to run again at the next start.
#[test]
fn agent_stopped_past_drain_timeout_reports_and_does_not_rerun() {
    let mut cluster = Cluster::start(&[]);
    let workdir = cluster.workdir("alpha");
    let agent_args = ["--drain-timeout", "1"];
    let agent = start_agent_with(&cluster.queue.addr, "alpha", &cluster.dispatch.url, &workdir, &[], &agent_args);
    cluster.agents.push(("alpha".into(), agent));
    wait_until(Duration::from_secs(10), "the agent registered", || get(&cluster.url("/v1/hosts/alpha")).0 == 200);
    let runs = cluster.dir.path().join("runs");
    let (status, body) = post(
        &cluster.url("/v1/jobs"),
        &json!({"hosts": ["alpha"], "method": "async.bash", "cmd": format!("echo run >> {}; echo started; sleep 30", runs.display()), "timeout": 60}),
    );
    assert_eq!(status, 202, "{body}");
    let url = cluster.url(&format!("/v1/jobs/{}", body["id"].as_str().expect("id")));
    wait_until(Duration::from_secs(10), "the command started", || line_count(&runs) == 1);
    let agent = cluster.agent("alpha");
    agent.signal("TERM").expect("SIGTERM the agent");
    assert_eq!(agent.wait_exit(Duration::from_secs(10)), Some(true), "the agent exits after the drain timeout");
    wait_until(Duration::from_secs(5), "the host reported", || get(&url).1["done"] == true);
    let job = get(&url).1;
    let host = &job["hosts"][0];
    assert_eq!(
        (host["state"].clone(), host["retcode"].clone()),
        (json!("failed"), code(Code::AgentRestarted)),
        "{job}"
    );
    let message = host["message"].as_str().unwrap_or("");
    assert!(message.starts_with("Killed: the agent was stopped while the command ran"), "{message}");
    assert_eq!(host["data"], "started\n");
    cluster.respawn_agent("alpha", &[]);
    std::thread::sleep(Duration::from_millis(2000));
    assert_eq!(line_count(&runs), 1, "the job ran again at the next start");
}

/// With `--heartbeat 1` the agent re-registers every second: `last_seen_ms` advances while
/// `registered_at_ms` stays.
#[test]
fn heartbeat_advances_last_seen() {
    let cluster = Cluster::start(&[]);
    let workdir = cluster.dir.path().join("hosts").join("beating");
    let _agent =
        start_agent_with(&cluster.queue.addr, "beating", &cluster.dispatch.url, &workdir, &[], &["--heartbeat", "1"]);
    let host_url = cluster.url("/v1/hosts/beating");
    wait_until(Duration::from_secs(10), "the agent registered", || get(&host_url).0 == 200);
    let first = get(&host_url).1;
    let seen = first["last_seen_ms"].as_i64().expect("last_seen_ms");
    wait_until(Duration::from_secs(5), "last_seen_ms advanced", || {
        get(&host_url).1["last_seen_ms"].as_i64().is_some_and(|now| now > seen)
    });
    assert_eq!(get(&host_url).1["registered_at_ms"], first["registered_at_ms"]);
}

/// An agent killed mid-command and never restarted: the job comes back to the queue when the
/// agent's connection drops, and at its deadline the host is reported as taken but not
/// finished, not as "the agent did not take the job" (which would be false).
#[test]
fn a_job_whose_agent_died_is_reported_as_taken_not_as_never_taken() {
    let mut cluster = Cluster::start(&["alpha"]);
    let runs = cluster.dir.path().join("runs");
    let pids = cluster.dir.path().join("pids");
    let cmd = format!("echo run >> {r}; echo $$ > {p}; exec sleep 600", r = runs.display(), p = pids.display());
    let (status, body) =
        post(&cluster.url("/v1/jobs"), &json!({"hosts": ["alpha"], "method": "async.bash", "cmd": cmd, "timeout": 3}));
    assert_eq!(status, 202, "{body}");
    let url = cluster.url(&format!("/v1/jobs/{}", body["id"].as_str().expect("id")));
    wait_until(Duration::from_secs(10), "the command started", || pids.exists());
    let pid: i32 = std::fs::read_to_string(&pids).expect("pid").trim().parse().expect("pid");
    let _cleanup = KillOnDrop(vec![pid]);
    cluster.agent("alpha").kill();
    wait_until(Duration::from_secs(20), "the host's final state", || get(&url).1["done"] == true);
    let job = get(&url).1;
    let host = &job["hosts"][0];
    assert_eq!(host["state"], "expired", "{job}");
    assert_eq!(host["retcode"], code(Code::HostNoAnswer), "{job}");
    let message = host["message"].as_str().unwrap_or_default();
    assert!(message.starts_with("The host's agent took the job but did not finish it"), "{job}");
    assert_eq!(line_count(&runs), 1);
}

/// The queue serves TLS only and requires client certificates: the dispatcher and the agents
/// connect with `--queue-ca`, `--queue-cert` and `--queue-key`; sync and async jobs run on
/// the agents, results come back through the TLS results consumer, and everything
/// reconnects over TLS after the queue restarts. (Always polarisd: beanstalkd has no TLS.)
#[test]
fn jobs_run_on_agents_over_a_tls_queue_with_client_certificates() {
    let mut cluster = Cluster::start_tls(&["alpha", "beta"], true);
    let sync_job = json!({"hosts": ["alpha", "beta"], "method": "sync.bash", "cmd": "cat README.txt", "timeout": 30});
    let (status, body) = post(&cluster.url("/v1/jobs"), &sync_job);
    assert_eq!(status, 200, "{body}");
    for (index, host) in ["alpha", "beta"].iter().enumerate() {
        let entry = &body["response"][index];
        assert_eq!((entry["host"].as_str(), entry["resp"].as_str()), (Some(*host), Some("success")), "{body}");
        assert_eq!(entry["data"], "hello\n", "{body}");
    }

    // The queue takes TLS clients with a certificate of the CA, and nobody else.
    let tls = cluster.tls.clone().expect("a TLS cluster");
    let config = client::TlsClientConfig::from_files(
        &tls.pki.ca,
        Some((&tls.pki.client_cert, &tls.pki.client_key)),
        "127.0.0.1",
    )
    .expect("client TLS config");
    let mut queue = Client::connect_tls(&cluster.queue.addr, &config, Duration::from_secs(2)).expect("TLS connect");
    assert_eq!(queue.stats_tube("host.alpha").expect("stats-tube").get_u64("current-watching"), Some(1));
    assert!(Client::connect(&cluster.queue.addr, Duration::from_secs(2)).and_then(|mut c| c.stats()).is_err());
    let no_cert = client::TlsClientConfig::from_files(&tls.pki.ca, None, "127.0.0.1").expect("config");
    assert!(Client::connect_tls(&cluster.queue.addr, &no_cert, Duration::from_secs(2))
        .and_then(|mut c| c.stats())
        .is_err());
    drop(queue);

    // A restarted queue: the dispatcher's pool, its results consumer and the agents all
    // come back over TLS.
    cluster.restart_queue();
    let (status, body) = post(
        &cluster.url("/v1/jobs"),
        &json!({"hosts": ["alpha", "beta"], "method": "async.bash", "cmd": "echo again", "timeout": 30}),
    );
    assert_eq!(status, 202, "{body}");
    let url = cluster.url(&format!("/v1/jobs/{}", body["id"].as_str().expect("id")));
    wait_until(Duration::from_secs(20), "the async job done over TLS", || get(&url).1["done"] == true);
    let job = get(&url).1;
    for index in 0..2 {
        assert_eq!(job["hosts"][index]["state"], "success", "{job}");
        assert_eq!(job["hosts"][index]["data"], "again\n", "{job}");
    }
}

/// The TLS flags of the agent and the dispatcher are checked at start, naming the file.
#[test]
fn bad_queue_tls_flags_stop_the_start_naming_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("missing-ca.pem");
    let missing = missing.to_str().expect("path");
    for (program, base) in [
        ("polaris-agent", vec!["--host-id", "alpha", "--state-file", "/nonexistent/state.json"]),
        ("polaris-dispatch", vec!["--listen", "127.0.0.1:0", "--data", dir.path().to_str().expect("path")]),
    ] {
        let run = |extra: &[&str]| {
            std::process::Command::new(polaris_testkit::binary(program))
                .args(&base)
                .args(extra)
                .env("POLARIS_SECRET", TEST_SECRET)
                .stdin(std::process::Stdio::null())
                .output()
                .expect("run")
        };
        let out = run(&["--queue-ca", missing]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains("--queue-ca") && stderr.contains(missing),
            "{program}: {stderr}"
        );
        let out = run(&["--queue-ca", missing, "--queue-cert", missing]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains("--queue-key"), "{program}: {stderr}");
        let out = run(&["--queue-server-name", "queue.example"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains("--queue-ca"), "{program}: {stderr}");
    }
}
