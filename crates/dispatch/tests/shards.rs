//! Two dispatchers on one PostgreSQL database and three polarisd queue shards, with real
//! agents: every host lands on the shard rendezvous hashing gives it, a sync job across
//! all hosts is answered, and when one shard and one dispatcher are killed during async
//! jobs, every host still answers every job, each command exactly once.
//!
//! Runs on the server env `POLARIS_TEST_DATABASE` names, else on a throwaway one started
//! from the installed PostgreSQL binaries; without either it is skipped (a failure under CI).

use polaris_proto::client::Client;
use polaris_testkit::cluster::*;
use polaris_testkit::postgres::{create_database, test_server};
use polaris_testkit::wait_until;
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

const HOSTS: [&str; 9] = ["h1", "h2", "h3", "h4", "h5", "h6", "h7", "h8", "h9"];

/// The shard a dispatcher says `host` belongs to.
fn shard_of(dispatch: &Dispatch, host: &str) -> Option<String> {
    let (status, body) = get(&format!("{}/v1/hosts/{host}", dispatch.url));
    (status == 200).then(|| body["queue"].as_str().map(str::to_string)).flatten()
}

/// Whether an agent watches `host`'s tube on the queue at `addr`.
fn watched_on(addr: &str, host: &str) -> bool {
    let Ok(mut client) = Client::connect(addr, Duration::from_secs(2)) else { return false };
    client
        .stats_tube(&format!("host.{host}"))
        .ok()
        .and_then(|stats| stats.get_u64("current-watching"))
        .is_some_and(|n| n > 0)
}

/// Submits an async job to every host; answers its id.
fn submit(dispatch: &Dispatch, cmd: &str) -> String {
    let body = json!({"hosts": HOSTS, "method": "async.bash", "cmd": cmd, "timeout": 60});
    let (status, reply) = post(&format!("{}/v1/jobs", dispatch.url), &body);
    assert_eq!(status, 202, "{reply}");
    reply["id"].as_str().expect("job id").to_string()
}

/// The job as `dispatch` reports it, once every host has its final answer.
fn wait_finished(dispatch: &Dispatch, id: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let (status, job) = get(&format!("{}/v1/jobs/{id}", dispatch.url));
        let finished = status == 200
            && job["hosts"].as_array().is_some_and(|hosts| {
                hosts.len() == HOSTS.len()
                    && hosts.iter().all(|h| !matches!(h["state"].as_str(), Some("pending" | "ready" | "reserved")))
            });
        if finished {
            return job;
        }
        assert!(Instant::now() < deadline, "job {id} not finished within {within:?}: {job}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn runs(workdir: &Path, tag: &str) -> usize {
    std::fs::read_to_string(workdir.join(format!("runs.{tag}"))).map_or(0, |text| text.lines().count())
}

#[test]
fn shards_and_dispatchers_die_and_no_host_is_lost_and_nothing_runs_twice() {
    let Some((_server_process, server)) = test_server("the shards test") else { return };
    let name = format!("polaris_shards_{}_{}", std::process::id(), polaris_ops_wire::wire::unix_now_ms());
    let url = create_database(&server, &name).expect("create the shared database");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut shards: Vec<Queue> = (0..3).map(|_| start_queue(BIG_JOB_SIZE)).collect();
    let list = shards.iter().map(|q| q.addr.as_str()).collect::<Vec<_>>().join(",");
    let args = ["--database", url.as_str(), "--lease-secs", "3", "--shard-grace", "2"];
    let a = start_dispatcher(&list, &dir.path().join("a"), &args);
    let mut b = start_dispatcher(&list, &dir.path().join("b"), &args);
    // Every agent starts on the first shard and is told its own when it registers; half
    // register with each dispatcher, and go to the other when theirs stops answering.
    let workdir = |host: &str| dir.path().join("hosts").join(host);
    let _agents: Vec<_> = HOSTS
        .iter()
        .enumerate()
        .map(|(n, host)| {
            let urls = if n % 2 == 0 { format!("{},{}", a.url, b.url) } else { format!("{},{}", b.url, a.url) };
            start_agent_with(&shards[0].addr, host, &urls, &workdir(host), &[], &["--heartbeat", "1"])
        })
        .collect();
    wait_until(Duration::from_secs(30), "every agent on the shard both dispatchers give it", || {
        HOSTS.iter().all(|host| {
            let (Some(from_a), Some(from_b)) = (shard_of(&a, host), shard_of(&b, host)) else { return false };
            from_a == from_b && watched_on(&from_a, host)
        })
    });
    let placement: Vec<String> = HOSTS.iter().map(|host| shard_of(&a, host).expect("placed")).collect();
    // The ports, and so the placement, differ from run to run; nine hosts on one shard
    // would mean the hashing is broken.
    let used = shards.iter().filter(|s| placement.contains(&s.addr)).count();
    assert!(used >= 2, "every host on one shard: {placement:?}");

    // A sync job across all hosts, answered on every shard.
    let body = json!({"hosts": HOSTS, "method": "sync.bash", "cmd": "echo hi", "timeout": 30});
    let (status, reply) = post(&format!("{}/v1/jobs", a.url), &body);
    assert_eq!(status, 200, "{reply}");
    let answers = reply["response"].as_array().expect("response array");
    assert_eq!(answers.len(), HOSTS.len(), "{reply}");
    assert!(answers.iter().all(|r| r["resp"] == "success" && r["data"] == "hi\n"), "{reply}");

    // A long job, then a short one queued behind it; while the first runs, the shard with
    // the most hosts and the dispatcher the agents of half the hosts report to are killed.
    let long = submit(&a, "echo ran >> runs.long; sleep 4; echo long");
    wait_until(Duration::from_secs(20), "every host runs the long job", || {
        HOSTS.iter().all(|host| runs(&workdir(host), "long") == 1)
    });
    let short = submit(&b, "echo ran >> runs.short; echo short");
    wait_until(Duration::from_secs(20), "the short job queued for every host", || {
        let (_, job) = get(&format!("{}/v1/jobs/{short}", a.url));
        job["hosts"].as_array().is_some_and(|hosts| hosts.iter().all(|h| h["state"] != "pending"))
    });
    let victim =
        (0..shards.len()).max_by_key(|&i| placement.iter().filter(|p| **p == shards[i].addr).count()).expect("a shard");
    let moved: Vec<&str> =
        HOSTS.iter().zip(&placement).filter(|(_, p)| **p == shards[victim].addr).map(|(h, _)| *h).collect();
    shards[victim].proc.kill();
    b.proc.kill();

    for (id, word) in [(&long, "long"), (&short, "short")] {
        let job = wait_finished(&a, id, Duration::from_secs(90));
        for host in job["hosts"].as_array().expect("hosts") {
            assert_eq!(host["state"], "success", "job {word}: {job}");
        }
    }
    for host in HOSTS {
        assert_eq!(runs(&workdir(host), "long"), 1, "host {host} ran the long job once");
        assert_eq!(runs(&workdir(host), "short"), 1, "host {host} ran the short job once");
    }
    // The metrics say which shard is gone.
    let (status, metrics) = request_text("GET", &format!("{}/metrics", a.url), None, None);
    assert_eq!(status, 200, "{metrics}");
    for (i, shard) in shards.iter().enumerate() {
        let line =
            format!("polaris_dispatch_queue_shard_up{{shard=\"{}\"}} {}", shard.addr, if i == victim { -1 } else { 1 });
        assert!(metrics.lines().any(|l| l == line), "no {line:?} in\n{metrics}");
    }
    // The victim's hosts now live on the survivors, and their agents followed.
    for host in &moved {
        let shard = shard_of(&a, host).expect("placed");
        assert_ne!(shard, shards[victim].addr, "host {host} still on the dead shard");
        assert!(watched_on(&shard, host), "host {host}'s agent did not follow to {shard}");
    }

    // The shard comes back where it was: its hosts return to it and work goes on, once
    // per host, on whichever shard each host is.
    let port = shards[victim].addr.rsplit(':').next().and_then(|p| p.parse::<u16>().ok()).expect("port");
    shards[victim] = start_queue_on_port(BIG_JOB_SIZE, Some(port));
    wait_until(Duration::from_secs(30), "the returned shard's hosts back on it", || {
        moved.iter().all(|host| {
            shard_of(&a, host).as_deref() == Some(shards[victim].addr.as_str())
                && watched_on(&shards[victim].addr, host)
        })
    });
    let again = submit(&a, "echo ran >> runs.again; echo again");
    let job = wait_finished(&a, &again, Duration::from_secs(60));
    for host in job["hosts"].as_array().expect("hosts") {
        assert_eq!(host["state"], "success", "after the shard came back: {job}");
    }
    for host in HOSTS {
        assert_eq!(runs(&workdir(host), "again"), 1, "host {host} ran the job once");
    }
}
