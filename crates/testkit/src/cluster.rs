//! The ops channel in a box: a queue (polarisd, or beanstalkd when
//! `POLARIS_TEST_QUEUE=beanstalkd`), `polaris-dispatch` and `polaris-agent` processes on
//! loopback, and HTTP/JSON calls to them. Every process is killed when its handle drops,
//! also when a test panics.

use crate::process::{binary, free_port, spawn_with_banner, wait_accepting, wait_until, Proc};
use crate::tls::TestPki;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// The shared envelope secret every test process uses.
pub const TEST_SECRET: &str = "polaris-test-secret-0123456789abcdef";

/// Max job size for queues that must carry 64 KiB results.
pub const BIG_JOB_SIZE: u32 = 1_048_576;

/// A running queue server.
pub struct Queue {
    pub addr: String,
    pub proc: Proc,
}

/// Starts the queue the tests run against: `polarisd` by default, `/usr/bin/beanstalkd`
/// when env `POLARIS_TEST_QUEUE=beanstalkd`.
pub fn start_queue(max_job_size: u32) -> Queue {
    start_queue_on_port(max_job_size, None)
}

/// Starts the queue on `port` (a free one when `None`), e.g. to restart it where clients
/// expect it.
pub fn start_queue_on_port(max_job_size: u32, port: Option<u16>) -> Queue {
    start_queue_with(max_job_size, port, &[])
}

/// Whether the tests run against beanstalkd (`POLARIS_TEST_QUEUE=beanstalkd`) rather than
/// polarisd.
pub fn testing_beanstalkd() -> bool {
    std::env::var("POLARIS_TEST_QUEUE").as_deref() == Ok("beanstalkd")
}

/// Starts polarisd (always polarisd: e.g. TLS, which beanstalkd has not) with `extra_args`
/// on `port` (a free one when `None`).
pub fn start_polarisd_queue(max_job_size: u32, port: Option<u16>, extra_args: &[String]) -> Queue {
    let (proc, addr) = spawn_with_banner(
        "polarisd",
        Command::new(binary("polarisd"))
            .args(["-l", "127.0.0.1", "-p", &port.unwrap_or(0).to_string(), "-z", &max_job_size.to_string()])
            .args(extra_args)
            .stdin(Stdio::null()),
        Duration::from_secs(10),
    )
    .expect("start polarisd");
    Queue { addr, proc }
}

/// As [`start_queue_on_port`], with extra polarisd flags (`extra_args` must be empty for
/// beanstalkd).
pub fn start_queue_with(max_job_size: u32, port: Option<u16>, extra_args: &[String]) -> Queue {
    let size = max_job_size.to_string();
    if testing_beanstalkd() {
        assert!(extra_args.is_empty(), "beanstalkd takes none of polarisd's flags {extra_args:?}");
        let port = port.unwrap_or_else(|| free_port().expect("free port"));
        let child = Command::new("/usr/bin/beanstalkd")
            .args(["-l", "127.0.0.1", "-p", &port.to_string(), "-z", &size])
            .stdin(Stdio::null())
            .spawn()
            .expect("start /usr/bin/beanstalkd");
        let addr = format!("127.0.0.1:{port}");
        let proc = Proc::new("beanstalkd", child);
        wait_accepting(&addr, Duration::from_secs(5));
        Queue { addr, proc }
    } else {
        start_polarisd_queue(max_job_size, port, extra_args)
    }
}

/// A running dispatcher.
pub struct Dispatch {
    pub url: String,
    pub proc: Proc,
}

/// Starts `polaris-dispatch` on a free loopback port with its database in `data_dir`
/// (SQLite), or, when env `POLARIS_TEST_DATABASE` names a PostgreSQL server, in that
/// server's database for `data_dir` (see [`crate::postgres::database_for`]).
pub fn start_dispatcher(queue_addr: &str, data_dir: &Path, extra_args: &[&str]) -> Dispatch {
    let database = crate::postgres::test_server_url()
        .filter(|_| !extra_args.contains(&"--database"))
        .map(|server| crate::postgres::database_for(&server, data_dir));
    let mut command = Command::new(binary("polaris-dispatch"));
    command.args(["--listen", "127.0.0.1:0", "--queue", queue_addr, "--data"]).arg(data_dir);
    if let Some(url) = &database {
        command.args(["--database", url]);
    }
    let (proc, addr) = spawn_with_banner(
        "polaris-dispatch",
        command.args(extra_args).env("POLARIS_SECRET", TEST_SECRET).env("RUST_LOG", "info").stdin(Stdio::null()),
        Duration::from_secs(10),
    )
    .expect("start polaris-dispatch");
    Dispatch { url: format!("http://{addr}"), proc }
}

/// Starts `polaris-agent` for `host_id`, running commands in `workdir`.
pub fn start_agent(queue_addr: &str, host_id: &str, dispatch_url: &str, workdir: &Path, env: &[(&str, &str)]) -> Proc {
    start_agent_with(queue_addr, host_id, dispatch_url, workdir, env, &[])
}

/// [`start_agent`] with extra command-line flags; `--kill-grace-ms` and `--drain-timeout`
/// given there replace the test defaults.
pub fn start_agent_with(
    queue_addr: &str,
    host_id: &str,
    dispatch_url: &str,
    workdir: &Path,
    env: &[(&str, &str)],
    extra_args: &[&str],
) -> Proc {
    std::fs::create_dir_all(workdir).expect("agent workdir");
    let state_dir = workdir.parent().unwrap_or(workdir).join("state");
    let mut command = Command::new(binary("polaris-agent"));
    command
        .args(["--queue", queue_addr, "--host-id", host_id, "--dispatch", dispatch_url])
        .arg("--state-file")
        .arg(state_dir.join(format!("{host_id}.json")))
        .args(extra_args)
        .current_dir(workdir)
        .env("POLARIS_SECRET", TEST_SECRET)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null());
    // Defaults that keep tests quick, unless `extra_args` sets them.
    for (flag, value) in [("--kill-grace-ms", "500"), ("--drain-timeout", "10")] {
        if !extra_args.contains(&flag) {
            command.args([flag, value]);
        }
    }
    for (key, value) in env {
        command.env(key, value);
    }
    Proc::new(&format!("agent {host_id}"), command.spawn().expect("start polaris-agent"))
}

/// TLS between the queue and everything that talks to it, in a [`Cluster`].
#[derive(Debug, Clone)]
pub struct ClusterTls {
    /// The certificates (in the cluster's directory).
    pub pki: TestPki,
    /// Whether polarisd requires client certificates (`--tls-client-ca`), which the
    /// dispatcher and the agents then present (`--queue-cert`, `--queue-key`).
    pub client_certs: bool,
}

/// A queue, a dispatcher and one agent per host, in a temporary directory.
pub struct Cluster {
    pub queue: Queue,
    pub dispatch: Dispatch,
    pub agents: Vec<(String, Proc)>,
    pub dir: tempfile::TempDir,
    pub dispatch_args: Vec<String>,
    /// Set when the queue serves TLS ([`Cluster::start_tls`]).
    pub tls: Option<ClusterTls>,
}

impl Cluster {
    /// Starts everything with a queue that takes 1 MiB jobs, and waits until every agent
    /// has registered.
    pub fn start(hosts: &[&str]) -> Cluster {
        Cluster::start_with(hosts, BIG_JOB_SIZE, &[], &[])
    }

    /// Starts everything with the given queue max job size, extra dispatcher flags and
    /// extra agent environment.
    pub fn start_with(
        hosts: &[&str],
        max_job_size: u32,
        dispatch_args: &[&str],
        agent_env: &[(&str, &str)],
    ) -> Cluster {
        Cluster::start_inner(hosts, max_job_size, dispatch_args, agent_env, None)
    }

    /// Starts everything with polarisd serving TLS only (certificates made now, in the
    /// cluster's directory), and the dispatcher and the agents connecting with `--queue-ca`
    /// (and `--queue-cert`/`--queue-key` when `client_certs`, which polarisd then requires).
    /// Always polarisd, whatever `POLARIS_TEST_QUEUE` says.
    pub fn start_tls(hosts: &[&str], client_certs: bool) -> Cluster {
        Cluster::start_inner(hosts, BIG_JOB_SIZE, &[], &[], Some(client_certs))
    }

    fn start_inner(
        hosts: &[&str],
        max_job_size: u32,
        dispatch_args: &[&str],
        agent_env: &[(&str, &str)],
        tls: Option<bool>,
    ) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let tls = tls.map(|client_certs| {
            let pki_dir = dir.path().join("pki");
            std::fs::create_dir_all(&pki_dir).expect("pki dir");
            ClusterTls { pki: TestPki::generate(&pki_dir), client_certs }
        });
        let queue = match &tls {
            Some(tls) => start_polarisd_queue(max_job_size, None, &tls.pki.server_args(tls.client_certs)),
            None => start_queue(max_job_size),
        };
        let client_args = tls.as_ref().map(|t| t.pki.queue_client_args(t.client_certs)).unwrap_or_default();
        let mut all_dispatch_args: Vec<String> = dispatch_args.iter().map(|s| s.to_string()).collect();
        all_dispatch_args.extend(client_args.iter().cloned());
        let dispatch_arg_refs: Vec<&str> = all_dispatch_args.iter().map(String::as_str).collect();
        let dispatch = start_dispatcher(&queue.addr, &dir.path().join("data"), &dispatch_arg_refs);
        let agent_args: Vec<&str> = client_args.iter().map(String::as_str).collect();
        let mut agents = Vec::new();
        for host in hosts {
            let workdir = dir.path().join("hosts").join(host);
            std::fs::create_dir_all(&workdir).expect("workdir");
            std::fs::write(workdir.join("README.txt"), "hello\n").expect("seed file");
            let agent = start_agent_with(&queue.addr, host, &dispatch.url, &workdir, agent_env, &agent_args);
            agents.push((host.to_string(), agent));
        }
        let cluster = Cluster { queue, dispatch, agents, dir, dispatch_args: all_dispatch_args, tls };
        let auth = agent_env.iter().find(|(k, _)| *k == "POLARIS_TOKEN").map(|(_, v)| v.to_string());
        wait_until(Duration::from_secs(15), "all agents registered", || {
            let (status, body) = request("GET", &cluster.url("/v1/hosts"), None, auth.as_deref());
            status == 200
                && hosts.iter().all(|h| body["hosts"].as_array().is_some_and(|list| list.iter().any(|e| e["id"] == *h)))
        });
        cluster
    }

    /// The dispatcher URL of `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.dispatch.url, path)
    }

    /// The workdir of `host`'s agent.
    pub fn workdir(&self, host: &str) -> PathBuf {
        self.dir.path().join("hosts").join(host)
    }

    /// The agent process of `host`.
    pub fn agent(&mut self, host: &str) -> &mut Proc {
        &mut self.agents.iter_mut().find(|(h, _)| h == host).unwrap_or_else(|| panic!("no agent {host}")).1
    }

    /// Starts `host`'s agent again (same flags, workdir and state file), e.g. after
    /// `agent(host).kill()`; the previous process is killed first if it still runs.
    pub fn respawn_agent(&mut self, host: &str, env: &[(&str, &str)]) {
        let (queue, url, workdir) = (self.queue.addr.clone(), self.dispatch.url.clone(), self.workdir(host));
        let tls_args = self.tls.as_ref().map(|t| t.pki.queue_client_args(t.client_certs)).unwrap_or_default();
        let tls_args: Vec<&str> = tls_args.iter().map(String::as_str).collect();
        let agent = self.agent(host);
        agent.kill();
        *agent = start_agent_with(&queue, host, &url, &workdir, env, &tls_args);
    }

    /// Kills the queue and starts a new, empty one on the same address.
    pub fn restart_queue(&mut self) {
        let port: u16 = self.queue.addr.rsplit(':').next().and_then(|p| p.parse().ok()).expect("queue port");
        self.queue.proc.kill();
        self.queue = match &self.tls {
            Some(tls) => start_polarisd_queue(BIG_JOB_SIZE, Some(port), &tls.pki.server_args(tls.client_certs)),
            None => start_queue_on_port(BIG_JOB_SIZE, Some(port)),
        };
    }

    /// Kills the queue (SIGKILL).
    pub fn stop_queue(&mut self) {
        self.queue.proc.kill();
    }

    /// Kills the dispatcher (SIGKILL, like a crash).
    pub fn crash_dispatcher(&mut self) {
        self.dispatch.proc.kill();
    }

    /// Starts a new dispatcher on the same database and queue.
    pub fn restart_dispatcher(&mut self) {
        let args: Vec<&str> = self.dispatch_args.iter().map(String::as_str).collect();
        self.dispatch = start_dispatcher(&self.queue.addr, &self.dir.path().join("data"), &args);
    }
}

/// One HTTP request; returns the status and the JSON body (`Null` when empty or not JSON).
pub fn request(method: &str, url: &str, body: Option<&str>, token: Option<&str>) -> (u16, Value) {
    let (status, text) = request_text(method, url, body, token);
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// One HTTP request; returns the status and the body text.
pub fn request_text(method: &str, url: &str, body: Option<&str>, token: Option<&str>) -> (u16, String) {
    let mut req = ureq::request(method, url).timeout(Duration::from_secs(120));
    if let Some(token) = token {
        req = req.set("Authorization", &format!("Bearer {token}"));
    }
    let result = match body {
        Some(body) => req.set("Content-Type", "application/json").send_string(body),
        None => req.call(),
    };
    let response = match result {
        Ok(response) => response,
        Err(ureq::Error::Status(_, response)) => response,
        Err(e) => panic!("{method} {url}: {e}"),
    };
    let status = response.status();
    (status, response.into_string().unwrap_or_default())
}

/// `POST url` with a JSON body.
pub fn post(url: &str, body: &Value) -> (u16, Value) {
    request("POST", url, Some(&body.to_string()), None)
}

/// `GET url`.
pub fn get(url: &str) -> (u16, Value) {
    request("GET", url, None, None)
}
