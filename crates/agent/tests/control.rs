//! Execution control end to end: a real queue (polarisd, or beanstalkd with
//! `POLARIS_TEST_QUEUE=beanstalkd`) and a real `polaris-agent` on loopback, driven by
//! envelopes and control messages this test signs and puts itself, as the dispatcher
//! would: cancel while running and before starting, cgroup containment of `setsid`
//! children, the memory limit, the ceilings, and attempts.

use polaris_agent::contain::{self, Containment};
use polaris_ops_wire::codes::Code;
use polaris_ops_wire::wire::{self, ControlKind, ControlMessage, HostResult, JobEnvelope, Method, Resp, Secret};
use polaris_proto::client::{Client, Endpoint, TlsClientFiles};
use polaris_testkit::cluster::{start_polarisd_queue, start_queue, BIG_JOB_SIZE, TEST_SECRET};
use polaris_testkit::tls::TestPki;
use polaris_testkit::{binary, pid_gone, skip_unless_ci, wait_until, Proc};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const REPLY_TUBE: &str = "polaris.results";

fn secret() -> Secret {
    Secret::new(TEST_SECRET.as_bytes().to_vec()).expect("test secret")
}

/// One agent for one host on a queue, in a temporary directory.
struct Rig {
    endpoint: Endpoint,
    host: String,
    dir: tempfile::TempDir,
    agent_args: Vec<String>,
    /// Run the agent as this uid and gid (root tests use `nobody`); `None`: as the test.
    run_as: Option<u32>,
    agent: Option<Proc>,
    _queue: polaris_testkit::cluster::Queue,
}

impl Rig {
    fn start(host: &str, agent_args: &[&str]) -> Rig {
        Rig::start_as(host, agent_args, None)
    }

    fn start_as(host: &str, agent_args: &[&str], run_as: Option<u32>) -> Rig {
        let queue = start_queue(BIG_JOB_SIZE);
        let endpoint = Endpoint::plain(&queue.addr);
        let args = agent_args.iter().map(|s| s.to_string()).collect();
        Rig::with_queue_as(queue, endpoint, host, args, run_as)
    }

    fn with_queue(queue: polaris_testkit::cluster::Queue, endpoint: Endpoint, host: &str, args: Vec<String>) -> Rig {
        Rig::with_queue_as(queue, endpoint, host, args, None)
    }

    fn with_queue_as(
        queue: polaris_testkit::cluster::Queue,
        endpoint: Endpoint,
        host: &str,
        args: Vec<String>,
        run_as: Option<u32>,
    ) -> Rig {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut rig =
            Rig { endpoint, host: host.to_string(), dir, agent_args: args, run_as, agent: None, _queue: queue };
        rig.spawn_agent();
        rig
    }

    fn spawn_agent(&mut self) {
        let work = self.dir.path().join("work");
        std::fs::create_dir_all(&work).expect("workdir");
        let mut command = Command::new(binary("polaris-agent"));
        if let Some(id) = self.run_as {
            for dir in [self.dir.path(), &work] {
                std::os::unix::fs::chown(dir, Some(id), Some(id)).expect("chown to the agent's user");
            }
            std::os::unix::process::CommandExt::uid(&mut command, id);
            std::os::unix::process::CommandExt::gid(&mut command, id);
        }
        let child = command
            .args(["--queue", self.endpoint.addr(), "--host-id", &self.host, "--kill-grace-ms", "500"])
            .arg("--state-file")
            .arg(self.dir.path().join("state/agent.json"))
            .args(&self.agent_args)
            .current_dir(&work)
            .env("POLARIS_SECRET", TEST_SECRET)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start polaris-agent");
        self.agent = Some(Proc::new(&format!("agent {}", self.host), child));
    }

    fn stop_agent(&mut self) {
        if let Some(agent) = self.agent.as_mut() {
            agent.signal("TERM").expect("SIGTERM the agent");
            assert_eq!(agent.wait_exit(Duration::from_secs(20)), Some(true), "the agent stops cleanly");
        }
        self.agent = None;
    }

    fn client(&self) -> Client {
        self.endpoint.connect(Duration::from_secs(2)).expect("connect to the queue")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn envelope(&self, job_id: &str, cmd: &str, timeout: u32) -> JobEnvelope {
        let now = wire::unix_now();
        JobEnvelope {
            v: 1,
            job_id: job_id.into(),
            host: self.host.clone(),
            method: Method::AsyncBash,
            cmd: cmd.into(),
            timeout,
            reply_tube: REPLY_TUBE.into(),
            issued_at: now,
            expires_at: now + u64::from(timeout),
            kill_grace_ms: None,
            attempt: None,
            memory_max: None,
            cpu_max_milli: None,
            args: None,
        }
    }

    fn put_envelope(&self, envelope: &JobEnvelope) {
        let mut conn = self.client();
        conn.use_tube(&wire::host_tube(&self.host)).expect("use");
        let body = wire::sign(&secret(), &serde_json::to_vec(envelope).expect("json"));
        conn.put(10, 0, envelope.timeout + 60, &body).expect("put the envelope");
    }

    fn put_cancel(&self, job_id: &str, attempt: Option<u32>) {
        let message = ControlMessage {
            v: 1,
            kind: ControlKind::Cancel,
            job_id: job_id.into(),
            host: self.host.clone(),
            attempt,
            issued_at: wire::unix_now(),
        };
        let mut conn = self.client();
        conn.use_tube(&wire::control_tube(&self.host)).expect("use");
        conn.put(0, 0, 60, &wire::sign(&secret(), &serde_json::to_vec(&message).expect("json"))).expect("put");
    }

    /// The next result on the reply tube, within `secs` (live output chunks are skipped).
    fn result(&self, secs: u32) -> HostResult {
        let mut conn = self.client();
        conn.watch(REPLY_TUBE).expect("watch");
        conn.ignore("default").expect("ignore");
        loop {
            let job = conn.reserve_with_timeout(secs).expect("reserve").unwrap_or_else(|| {
                panic!("no result within {secs}s; agent log:\n{}", self.agent_log());
            });
            conn.delete(job.id).expect("delete");
            let payload = wire::open(&secret(), &job.body).expect("a signed result");
            match wire::Reply::parse(payload).expect("a result") {
                wire::Reply::Result(result) => return result,
                wire::Reply::Output(_) | wire::Reply::Integrity(_) | wire::Reply::Log(_) => continue,
            }
        }
    }

    fn agent_log(&self) -> String {
        self.agent.as_ref().map(|a| a.output_tail(64 * 1024)).unwrap_or_default()
    }

    /// How many jobs are buried in the host's tube.
    fn buried(&self) -> u64 {
        let stats = self.client().stats_tube(&wire::host_tube(&self.host)).expect("stats-tube");
        stats.get_u64("current-jobs-buried").unwrap_or(0)
    }

    /// Waits for `file` to hold a pid and returns it.
    fn wait_pid(&self, file: &Path) -> i32 {
        let mut pid = None;
        wait_until(Duration::from_secs(20), "the command wrote its pid", || {
            pid = std::fs::read_to_string(file).ok().and_then(|t| t.trim().parse().ok());
            pid.is_some()
        });
        pid.unwrap_or_default()
    }
}

fn wait_gone(pid: i32, what: &str) -> Duration {
    let begun = Instant::now();
    wait_until(Duration::from_secs(10), what, || pid_gone(pid));
    begun.elapsed()
}

/// Whether the agent (root in the same place as this test) gets cgroups; prints SKIP (or
/// fails under CI) when not.
fn cgroups_here(needs_memory: bool) -> bool {
    let containment = Containment::detect();
    let ok = containment.uses_cgroups() && (!needs_memory || containment.limits_memory());
    if !ok {
        skip_unless_ci(&format!("cgroup containment unavailable here: {}", containment.describe()));
    }
    ok
}

/// The cgroup v2 directory process `pid` is in.
fn unit_of(pid: i32) -> PathBuf {
    let mounts = contain::parse_mountinfo(&std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo"));
    let own = contain::parse_proc_cgroup(&std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup"));
    let (root, mount_point) = mounts.v2.expect("a cgroup v2 mount");
    contain::cgroup_dir(&mount_point, &root, &own.v2.expect("a v2 cgroup")).expect("inside the mount")
}

fn log_measure(what: &str, took: Duration) {
    let _ = writeln!(std::io::stderr(), "MEASURED: {what}: {} ms", took.as_millis());
}

#[test]
fn cancel_kills_the_running_command_and_reports_its_output() {
    let rig = Rig::start("web-cancel", &[]);
    let pid_file = rig.path("pid");
    let cmd = format!("echo started; echo $$ > {}; sleep 600", pid_file.display());
    rig.put_envelope(&rig.envelope("c1", &cmd, 300));
    let pid = rig.wait_pid(&pid_file);
    let begun = Instant::now();
    rig.put_cancel("c1", None);
    let result = rig.result(30);
    let answered = begun.elapsed();
    assert_eq!(result.resp, Resp::Failed, "{result:?}");
    assert_eq!(result.retcode, u32::from(Code::Cancelled.value()), "{result:?}");
    assert!(result.message.starts_with("Cancelled while it ran (DELETE /v1/jobs/c1); killed "), "{result:?}");
    assert_eq!(result.data, "started\n");
    assert_eq!(result.attempt, None);
    let gone = begun.elapsed().max(wait_gone(pid, "the cancelled command is gone"));
    log_measure("cancel put → result on the reply tube", answered);
    log_measure("cancel put → process gone", gone);
    // Nothing is left of it on the queue.
    wait_until(Duration::from_secs(10), "the job is deleted", || {
        let stats = rig.client().stats_tube(&wire::host_tube(&rig.host)).expect("stats-tube");
        stats.get_u64("current-jobs-reserved") == Some(0) && stats.get_u64("current-jobs-buried") == Some(0)
    });
}

#[test]
fn a_setsid_child_is_gone_after_cancel_and_after_timeout() {
    if !cgroups_here(false) {
        return;
    }
    let rig = Rig::start("web-setsid", &[]);
    for (job_id, timeout, cancel) in [("s-cancel", 300, true), ("s-timeout", 2, false)] {
        let pid_file = rig.path(&format!("{job_id}.pid"));
        let cmd =
            format!("setsid sleep 600 > /dev/null 2>&1 & echo $! > {}; echo forked; sleep 600", pid_file.display());
        rig.put_envelope(&rig.envelope(job_id, &cmd, timeout));
        let escaped = rig.wait_pid(&pid_file);
        // It really left the process group: only the cgroup holds it. `$!` is known as soon
        // as setsid(1) is forked, a moment before it calls setsid(2), so wait for that.
        let pgrp = || {
            let stat = std::fs::read_to_string(format!("/proc/{escaped}/stat")).expect("the child's stat");
            stat.rsplit(')').next().and_then(|r| r.split_whitespace().nth(2)?.parse::<i32>().ok()).expect("pgrp")
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while pgrp() != escaped && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(pgrp(), escaped, "setsid made it a group leader of its own");
        let unit = unit_of(escaped);
        assert!(unit.to_string_lossy().contains("/polaris-agent/"), "it runs in its own cgroup: {unit:?}");
        let begun = Instant::now();
        if cancel {
            rig.put_cancel(job_id, None);
        }
        let result = rig.result(30);
        let expected = if cancel { Code::Cancelled } else { Code::ExecTimeout };
        assert_eq!(result.retcode, u32::from(expected.value()), "{result:?}");
        assert_eq!(result.data, "forked\n");
        let gone = wait_gone(escaped, "the setsid child is gone");
        log_measure(&format!("{job_id}: result → setsid child gone"), gone);
        if cancel {
            assert!(result.message.ends_with("killed 2 process(es)"), "{result:?}");
            log_measure("cancel put → setsid child gone", begun.elapsed());
        }
        // Nothing is left behind: the run's cgroup is removed.
        wait_until(Duration::from_secs(10), "the run's cgroup is removed", || !unit.exists());
    }
}

#[test]
fn the_memory_limit_kills_the_command_and_says_so() {
    if !cgroups_here(true) {
        return;
    }
    let rig = Rig::start("web-memory", &[]);
    let mut envelope = rig.envelope("m1", "echo before; head -c 600M /dev/zero | tail > /dev/null; echo after", 120);
    envelope.memory_max = Some(64 << 20);
    rig.put_envelope(&envelope);
    let result = rig.result(120);
    assert_eq!(result.resp, Resp::Failed, "{result:?}");
    assert_eq!(result.retcode, u32::from(Code::MemoryLimit.value()), "{result:?}");
    assert!(result.message.starts_with("Killed by its memory limit (memory_max 67108864 bytes)"), "{result:?}");
    assert!(result.data.starts_with("before\n"), "{result:?}");
    // A command within its limit (and a CPU limit) runs as usual.
    let mut envelope = rig.envelope("m2", "head -c 16M /dev/zero | tail | wc -c", 120);
    envelope.memory_max = Some(64 << 20);
    envelope.cpu_max_milli = Some(500);
    rig.put_envelope(&envelope);
    let result = rig.result(120);
    assert_eq!((result.resp, result.retcode, result.data.as_str()), (Resp::Success, 0, "16777216\n"), "{result:?}");
}

#[test]
fn limits_above_the_ceiling_are_refused_and_never_run() {
    let rig = Rig::start("web-ceiling", &["--max-memory", "134217728", "--max-cpu-milli", "1000"]);
    let marker = rig.path("ran");
    let cmd = format!("touch {}", marker.display());
    let mut too_much_memory = rig.envelope("l1", &cmd, 30);
    too_much_memory.memory_max = Some(1 << 30);
    rig.put_envelope(&too_much_memory);
    let result = rig.result(30);
    assert_eq!((result.resp, result.retcode), (Resp::Failed, u32::from(Code::LimitAboveCeiling.value())), "{result:?}");
    assert!(
        result.message.contains("above this agent's ceiling of 134217728 bytes (--max-memory, [limits] max_memory)"),
        "{result:?}"
    );
    let mut too_much_cpu = rig.envelope("l2", &cmd, 30);
    too_much_cpu.cpu_max_milli = Some(4000);
    too_much_cpu.attempt = Some(3);
    rig.put_envelope(&too_much_cpu);
    let result = rig.result(30);
    assert_eq!(result.retcode, u32::from(Code::LimitAboveCeiling.value()), "{result:?}");
    assert!(result.message.contains("--max-cpu-milli"), "{result:?}");
    assert_eq!(result.attempt, Some(3), "refusals echo the attempt");
    assert_eq!(rig.buried(), 2);
    assert!(!marker.exists(), "a refused command ran");
}

#[test]
fn a_cancel_before_the_start_refuses_the_envelope_even_after_a_restart() {
    let mut rig = Rig::start("web-early", &[]);
    let marker = rig.path("ran");
    rig.put_cancel("e1", None);
    rig.put_cancel("e2", Some(2));
    // The agent has taken both control messages off its tube.
    wait_until(Duration::from_secs(10), "the cancels were handled", || {
        let stats = rig.client().stats_tube(&wire::control_tube(&rig.host)).expect("stats-tube");
        stats.get_u64("total-jobs") == Some(2)
            && stats.get_u64("current-jobs-ready") == Some(0)
            && stats.get_u64("current-jobs-reserved") == Some(0)
    });
    // The cancels are in the ledger: they outlive the agent.
    rig.stop_agent();
    rig.spawn_agent();
    let cmd = format!("touch {}", marker.display());
    rig.put_envelope(&rig.envelope("e1", &cmd, 30));
    let result = rig.result(30);
    assert_eq!((result.resp, result.retcode), (Resp::Failed, u32::from(Code::Cancelled.value())), "{result:?}");
    assert!(result.message.starts_with("Cancelled before it started"), "{result:?}");
    // A cancel of attempt 2 refuses attempt 2 only.
    let mut second = rig.envelope("e2", &cmd, 30);
    second.attempt = Some(2);
    rig.put_envelope(&second);
    let result = rig.result(30);
    assert_eq!((result.retcode, result.attempt), (u32::from(Code::Cancelled.value()), Some(2)), "{result:?}");
    assert!(!marker.exists(), "a cancelled command ran");
    assert_eq!(rig.buried(), 2);
    let mut third = rig.envelope("e2", "echo third", 30);
    third.attempt = Some(3);
    rig.put_envelope(&third);
    let result = rig.result(30);
    assert_eq!((result.resp, result.data.as_str(), result.attempt), (Resp::Success, "third\n", Some(3)));
}

#[test]
fn a_retry_runs_and_a_copy_of_it_is_refused() {
    let rig = Rig::start("web-retry", &[]);
    let mut first = rig.envelope("r1", "echo run $POLARIS_RUN_ID | wc -w", 30);
    first.attempt = Some(1);
    rig.put_envelope(&first);
    let result = rig.result(30);
    assert_eq!((result.resp, result.data.as_str(), result.attempt), (Resp::Success, "2\n", Some(1)));
    let mut retry = first.clone();
    retry.attempt = Some(2);
    rig.put_envelope(&retry);
    let result = rig.result(30);
    assert_eq!((result.resp, result.data.as_str(), result.attempt), (Resp::Success, "2\n", Some(2)), "{result:?}");
    // The same attempt again is a replay; so is attempt 1 without the field.
    rig.put_envelope(&retry);
    let result = rig.result(30);
    assert_eq!((result.retcode, result.attempt), (u32::from(Code::EnvelopeReplayed.value()), Some(2)), "{result:?}");
    let mut unnumbered = first.clone();
    unnumbered.attempt = None;
    rig.put_envelope(&unnumbered);
    let result = rig.result(30);
    assert_eq!((result.retcode, result.attempt), (u32::from(Code::EnvelopeReplayed.value()), None), "{result:?}");
    assert_eq!(rig.buried(), 2);
}

#[test]
fn cancel_works_over_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = TestPki::generate(dir.path());
    let queue = start_polarisd_queue(BIG_JOB_SIZE, None, &pki.server_args(true));
    let files = TlsClientFiles {
        ca: pki.ca.clone(),
        cert: Some(pki.client_cert.clone()),
        key: Some(pki.client_key.clone()),
        server_name: None,
    };
    let endpoint = Endpoint::from_flags(&queue.addr, Some(&files)).expect("TLS endpoint");
    let rig = Rig::with_queue(queue, endpoint, "web-tls", pki.queue_client_args(true));
    let pid_file = rig.path("pid");
    rig.put_envelope(&rig.envelope("t1", &format!("echo $$ > {}; exec sleep 600", pid_file.display()), 300));
    let pid = rig.wait_pid(&pid_file);
    rig.put_cancel("t1", Some(1));
    let result = rig.result(30);
    assert_eq!(result.retcode, u32::from(Code::Cancelled.value()), "{result:?}");
    wait_gone(pid, "the cancelled command is gone");
}

#[test]
fn a_restarted_agent_kills_the_whole_cgroup_its_dead_predecessor_left() {
    if !cgroups_here(false) {
        return;
    }
    let mut rig = Rig::start("web-orphan", &[]);
    let pid_file = rig.path("pid");
    let cmd = format!("setsid sleep 600 > /dev/null 2>&1 & echo $! > {}; sleep 600", pid_file.display());
    rig.put_envelope(&rig.envelope("o1", &cmd, 300));
    let escaped = rig.wait_pid(&pid_file);
    let unit = unit_of(escaped);
    // The agent dies without a word; its command and the setsid child live on.
    rig.agent.as_mut().expect("agent").kill();
    rig.agent = None;
    std::thread::sleep(Duration::from_millis(200));
    assert!(!pid_gone(escaped), "the setsid child outlived the agent, for now");
    rig.spawn_agent();
    let result = rig.result(30);
    assert_eq!(result.retcode, u32::from(Code::AgentRestarted.value()), "{result:?}");
    wait_gone(escaped, "the setsid child of the dead agent's command is gone");
    wait_until(Duration::from_secs(10), "the dead run's cgroup is removed", || !unit.exists());
}

#[test]
fn forged_and_stale_control_messages_are_not_acted_on() {
    let rig = Rig::start("web-forged", &[]);
    let pid_file = rig.path("pid");
    rig.put_envelope(&rig.envelope("f1", &format!("echo $$ > {}; exec sleep 600", pid_file.display()), 300));
    let pid = rig.wait_pid(&pid_file);
    let cancel = |issued_at: u64| ControlMessage {
        v: 1,
        kind: ControlKind::Cancel,
        job_id: "f1".into(),
        host: rig.host.clone(),
        attempt: None,
        issued_at,
    };
    let forger = Secret::new(b"not-the-shared-secret-at-all".to_vec()).expect("secret");
    let mut conn = rig.client();
    conn.use_tube(&wire::control_tube(&rig.host)).expect("use");
    let forged = wire::sign(&forger, &serde_json::to_vec(&cancel(wire::unix_now())).expect("json"));
    conn.put(0, 0, 60, &forged).expect("put");
    let stale = wire::sign(&secret(), &serde_json::to_vec(&cancel(wire::unix_now() - 7200)).expect("json"));
    conn.put(0, 0, 60, &stale).expect("put");
    let mut other_host = cancel(wire::unix_now());
    other_host.host = "web-other".into();
    conn.put(0, 0, 60, &wire::sign(&secret(), &serde_json::to_vec(&other_host).expect("json"))).expect("put");
    // The forged one is buried; the stale one and the one for another host are deleted.
    wait_until(Duration::from_secs(10), "the control messages were handled", || {
        let stats = rig.client().stats_tube(&wire::control_tube(&rig.host)).expect("stats-tube");
        stats.get_u64("current-jobs-buried") == Some(1)
            && stats.get_u64("current-jobs-ready") == Some(0)
            && stats.get_u64("current-jobs-reserved") == Some(0)
    });
    std::thread::sleep(Duration::from_millis(200));
    assert!(!pid_gone(pid), "the command was stopped by a message that should not count");
    // A real one still works.
    rig.put_cancel("f1", None);
    let result = rig.result(30);
    assert_eq!(result.retcode, u32::from(Code::Cancelled.value()), "{result:?}");
    wait_gone(pid, "the cancelled command is gone");
}

#[test]
fn a_command_draining_after_sigterm_can_still_be_cancelled() {
    let mut rig = Rig::start("web-drain", &["--drain-timeout", "300"]);
    let pid_file = rig.path("pid");
    rig.put_envelope(&rig.envelope("d1", &format!("echo $$ > {}; exec sleep 600", pid_file.display()), 300));
    let pid = rig.wait_pid(&pid_file);
    rig.agent.as_ref().expect("agent").signal("TERM").expect("SIGTERM the agent");
    std::thread::sleep(Duration::from_millis(300));
    assert!(!pid_gone(pid), "the command drains");
    rig.put_cancel("d1", None);
    let result = rig.result(30);
    assert_eq!(result.retcode, u32::from(Code::Cancelled.value()), "{result:?}");
    wait_gone(pid, "the cancelled command is gone");
    let agent = rig.agent.as_mut().expect("agent");
    assert_eq!(agent.wait_exit(Duration::from_secs(20)), Some(true), "the agent stops once the command is over");
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .is_ok_and(|status| status.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")))
}

/// The uid of `nobody`: an agent running as it cannot write cgroupfs.
const NOBODY: u32 = 65_534;

#[test]
fn without_cgroups_the_agent_says_so_refuses_limits_and_still_cancels() {
    // As root, the agent runs as nobody, who cannot make cgroups; otherwise as the test's
    // own user, who cannot either.
    let rig = Rig::start_as("web-plain", &[], running_as_root().then_some(NOBODY));
    let mut limited = rig.envelope("p1", "echo ran", 30);
    limited.memory_max = Some(64 << 20);
    rig.put_envelope(&limited);
    let result = rig.result(30);
    assert_eq!((result.resp, result.retcode), (Resp::Failed, u32::from(Code::LimitUnavailable.value())), "{result:?}");
    assert!(result.message.contains("process groups only: "), "{result:?}");
    // The agent's stderr is collected by a thread of the test's, which may lag behind.
    wait_until(Duration::from_secs(10), "the agent says it has process groups only", || {
        rig.agent_log().contains("containment: process groups only: ")
    });
    // Cancel does not need cgroups: the process group is killed.
    let pid_file = rig.path("work/pid");
    rig.put_envelope(&rig.envelope("p2", &format!("echo $$ > {}; exec sleep 600", pid_file.display()), 300));
    let pid = rig.wait_pid(&pid_file);
    rig.put_cancel("p2", None);
    let result = rig.result(30);
    assert_eq!(result.retcode, u32::from(Code::Cancelled.value()), "{result:?}");
    assert!(result.message.ends_with("killed 1 process(es)"), "{result:?}");
    wait_gone(pid, "the cancelled command is gone");
}

#[test]
fn agent_shutdown_kills_a_double_forked_setsid_child() {
    if !cgroups_here(false) {
        return;
    }
    let mut rig = Rig::start("web-shutdown", &["--drain-timeout", "1"]);
    let pid_file = rig.path("pid");
    // Double fork: the grandchild's parent exits at once, so it is reparented, and setsid
    // takes it out of the process group as well.
    let cmd = format!(
        "( setsid sleep 600 > /dev/null 2>&1 & echo $! > {}.tmp; mv {0}.tmp {0} ) & wait; echo detached; sleep 600",
        pid_file.display()
    );
    rig.put_envelope(&rig.envelope("x1", &cmd, 300));
    let escaped = rig.wait_pid(&pid_file);
    let unit = unit_of(escaped);
    rig.agent.as_ref().expect("agent").signal("TERM").expect("SIGTERM the agent");
    let result = rig.result(30);
    assert_eq!(result.retcode, u32::from(Code::AgentRestarted.value()), "{result:?}");
    assert_eq!(result.data, "detached\n");
    wait_gone(escaped, "the double-forked setsid child is gone");
    wait_until(Duration::from_secs(10), "the run's cgroup is removed", || !unit.exists());
    let agent = rig.agent.as_mut().expect("agent");
    assert_eq!(agent.wait_exit(Duration::from_secs(20)), Some(true), "the agent stops");
}
