//! Durability of `polarisd -b DIR`: restarts, SIGKILL under load, damaged
//! files, full disks, and the size of the database.

use anyhow::{bail, ensure, Context, Result};
use polaris_testkit::{spawn_polarisd, RawConn, ServerProcess};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

fn start(dir: &Path, extra: &[&str]) -> Result<ServerProcess> {
    let dir = dir.to_str().context("temp dir path is not UTF-8")?;
    let mut args = vec!["-b", dir];
    args.extend_from_slice(extra);
    spawn_polarisd(&args)
}

/// A `-f 0` server on `db` with the fault injection `fault` (`FAIL_COMMITS_ENV`,
/// `FAIL_SYNCS_ENV`) armed while `flag` exists.
fn start_with_fault(db: &Path, fault: &str, flag: &Path) -> Result<ServerProcess> {
    let (db, flag) = (db.to_str().context("utf-8")?, flag.to_str().context("utf-8")?);
    polaris_testkit::spawn_announcing_with_env(
        &polaris_testkit::binary("polarisd"),
        &["-b", db, "-f", "0"],
        &[(fault, flag)],
    )
}

fn stats_job(conn: &mut RawConn, id: u64) -> Result<HashMap<String, String>> {
    let reply = conn.roundtrip(format!("stats-job {id}\r\n").as_bytes())?;
    let text = reply.line_str();
    let body = reply.body.with_context(|| format!("stats-job {id}: {text}"))?;
    Ok(String::from_utf8_lossy(&body)
        .lines()
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

/// Runs polarisd once to completion with `args` and returns (success, output).
fn run_to_exit(args: &[&str]) -> Result<(bool, String)> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_polarisd"))
        .args(["-l", "127.0.0.1", "-p", "0"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait()? {
            let out = child.wait_with_output()?;
            let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            return Ok((status.success(), text));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("polarisd {args:?} did not exit");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn every_job_state_survives_a_kill() -> Result<()> {
    let dir = tempfile::tempdir()?;
    {
        let server = start(dir.path(), &["-f", "0"])?;
        let mut c = server.connect()?;
        assert_eq!(c.line("use work\r\n")?, "USING work");
        assert_eq!(c.line("put 7 0 30 5\r\nready\r\n")?, "INSERTED 1");
        assert_eq!(c.line("put 8 100 30 7\r\ndelayed\r\n")?, "INSERTED 2");
        assert_eq!(c.line("put 9 0 30 6\r\nburied\r\n")?, "INSERTED 3");
        assert_eq!(c.line("put 10 0 30 8\r\nreserved\r\n")?, "INSERTED 4");
        assert_eq!(c.line("put 0 0 30 4\r\ngone\r\n")?, "INSERTED 5");
        assert_eq!(c.line("reserve-job 3\r\n")?, "RESERVED 3 6");
        assert_eq!(c.line("bury 3 11\r\n")?, "BURIED");
        assert_eq!(c.line("reserve-job 4\r\n")?, "RESERVED 4 8");
        assert_eq!(c.line("delete 5\r\n")?, "DELETED");
        // Dropping the server SIGKILLs it.
    }
    let server = start(dir.path(), &["-f", "0"])?;
    let mut c = server.connect()?;
    let expect = [
        (1, "ready", "7", "ready"),
        (2, "delayed", "8", "delayed"),
        (3, "buried", "11", "buried"),
        (4, "ready", "10", "reserved"),
    ];
    for (id, state, pri, body) in expect {
        let s = stats_job(&mut c, id)?;
        assert_eq!(s["state"], state, "job {id}");
        assert_eq!(s["pri"], pri, "job {id}");
        assert_eq!(s["tube"], "work", "job {id}");
        let peek = c.roundtrip(format!("peek {id}\r\n").as_bytes())?;
        assert_eq!(peek.body.as_deref(), Some(body.as_bytes()));
    }
    let delayed = stats_job(&mut c, 2)?;
    let left: u64 = delayed["time-left"].parse()?;
    assert!((95..=100).contains(&left), "remaining delay kept: {left}");
    assert_eq!(stats_job(&mut c, 3)?["buries"], "1");
    assert_eq!(c.line("peek 5\r\n")?, "NOT_FOUND");
    assert_eq!(c.line("job-state 5\r\n")?, "STATE revoked");
    // New ids continue above the highest ever issued, even a deleted one.
    assert_eq!(c.line("put 0 0 1 1\r\nx\r\n")?, "INSERTED 6");
    Ok(())
}

#[test]
fn ids_continue_after_everything_was_deleted() -> Result<()> {
    let dir = tempfile::tempdir()?;
    {
        let server = start(dir.path(), &[])?;
        let mut c = server.connect()?;
        for i in 1..=3 {
            assert_eq!(c.line("put 0 0 1 1\r\nx\r\n")?, format!("INSERTED {i}"));
            assert_eq!(c.line(&format!("delete {i}\r\n"))?, "DELETED");
        }
        server.signal("TERM")?;
        thread::sleep(Duration::from_millis(300));
    }
    let server = start(dir.path(), &[])?;
    let mut c = server.connect()?;
    assert_eq!(c.line("put 0 0 1 1\r\nx\r\n")?, "INSERTED 4");
    Ok(())
}

/// The highest id is usually shown by a row (the job's, or its final state's), so the
/// store writes it on its own only when no row does: here, with no final states kept,
/// after the highest job is deleted, and for a job put and deleted in one turn.
#[test]
fn ids_continue_after_a_kill_when_no_row_shows_the_highest_id() -> Result<()> {
    let dir = tempfile::tempdir()?;
    {
        let server = start(dir.path(), &["--max-tombstones", "0"])?;
        let mut c = server.connect()?;
        for i in 1..=3 {
            assert_eq!(c.line("put 0 0 60 1\r\nx\r\n")?, format!("INSERTED {i}"));
        }
        assert_eq!(c.line("delete 3\r\n")?, "DELETED");
        c.send(b"put 0 0 60 1\r\ny\r\ndelete 4\r\n")?;
        assert_eq!(c.read_reply()?.line_str(), "INSERTED 4");
        assert_eq!(c.read_reply()?.line_str(), "DELETED");
        drop(server); // SIGKILL
    }
    let server = start(dir.path(), &["--max-tombstones", "0"])?;
    let mut c = server.connect()?;
    assert_eq!(c.line("put 0 0 60 1\r\nz\r\n")?, "INSERTED 5");
    assert!(c.roundtrip(b"peek 2\r\n")?.line_str().starts_with("FOUND 2 "));
    assert_eq!(c.line("peek 3\r\n")?, "NOT_FOUND");
    Ok(())
}

#[test]
fn ttl_and_tombstones_survive_a_restart() -> Result<()> {
    let dir = tempfile::tempdir()?;
    {
        let server = start(dir.path(), &["-f", "0"])?;
        let mut c = server.connect()?;
        assert_eq!(c.line("put 0 0 30 1 ttl=2\r\na\r\n")?, "INSERTED 1");
        assert_eq!(c.line("put 0 0 30 1 ttl=3600\r\nb\r\n")?, "INSERTED 2");
        assert_eq!(c.line("tube-ttl default 1\r\n")?, "TTL_SET");
        assert_eq!(c.line("put 0 0 30 1\r\nc\r\n")?, "INSERTED 3");
        assert_eq!(c.line("reserve-job 2\r\n")?, "RESERVED 2 1");
        assert_eq!(c.line("put 0 0 30 1\r\nd\r\n")?, "INSERTED 4");
        assert_eq!(c.line("revoke 4\r\n")?, "REVOKED");
    }
    // Down for longer than job 1's and job 3's TTL: time spent down counts.
    thread::sleep(Duration::from_millis(2200));
    let server = start(dir.path(), &["-f", "0"])?;
    let mut c = server.connect()?;
    thread::sleep(Duration::from_millis(100));
    assert_eq!(c.line("job-state 1\r\n")?, "STATE expired");
    assert_eq!(c.line("job-state 3\r\n")?, "STATE expired");
    // Job 2 was reserved before the crash: its TTL no longer applies.
    assert_eq!(c.line("job-state 2\r\n")?, "STATE ready");
    assert_eq!(c.line("job-state 4\r\n")?, "STATE revoked");
    // The tube default was persisted.
    assert_eq!(c.line("put 0 0 30 1\r\ne\r\n")?, "INSERTED 5");
    thread::sleep(Duration::from_millis(1300));
    assert_eq!(c.line("job-state 5\r\n")?, "STATE expired");
    Ok(())
}

/// The largest delay, TTL and TTR a client may send: the wall-clock deadlines the store
/// computes from them must saturate, not wrap (or panic, with overflow checks on).
#[test]
fn the_largest_delay_and_ttl_survive_a_restart() -> Result<()> {
    let dir = tempfile::tempdir()?;
    {
        let server = start(dir.path(), &["-f", "0"])?;
        let mut c = server.connect()?;
        assert_eq!(c.line("put 4294967295 4294967295 4294967295 1 ttl=4294967295\r\na\r\n")?, "INSERTED 1");
        assert_eq!(c.line("put 0 0 4294967295 1 ttl=4294967295\r\nb\r\n")?, "INSERTED 2");
        assert_eq!(c.line("job-state 1\r\n")?, "STATE delayed");
        server.signal("TERM")?;
        thread::sleep(Duration::from_millis(300));
    }
    let server = start(dir.path(), &["-f", "0"])?;
    let mut c = server.connect()?;
    assert_eq!(c.line("job-state 1\r\n")?, "STATE delayed");
    assert_eq!(c.line("job-state 2\r\n")?, "STATE ready");
    let job = stats_job(&mut c, 1)?;
    assert_eq!(job["pri"], "4294967295");
    assert_eq!(job["delay"], "4294967295");
    assert_eq!(job["ttr"], "4294967295");
    Ok(())
}

/// beanstalkd keeps a job's creation time in its binlog; so does the store: `age` counts
/// from the put, not from the restart.
#[test]
fn a_jobs_age_survives_a_restart() -> Result<()> {
    let dir = tempfile::tempdir()?;
    {
        let server = start(dir.path(), &["-f", "0"])?;
        let mut c = server.connect()?;
        assert_eq!(c.line("put 0 0 60 1\r\na\r\n")?, "INSERTED 1");
        thread::sleep(Duration::from_millis(2100));
        server.signal("TERM")?;
        thread::sleep(Duration::from_millis(300));
    }
    let server = start(dir.path(), &["-f", "0"])?;
    let mut c = server.connect()?;
    let age: u64 = stats_job(&mut c, 1)?["age"].parse()?;
    assert!(age >= 2, "age {age} restarted from zero");
    Ok(())
}

/// What one load thread saw acknowledged.
#[derive(Default)]
struct Acks {
    inserted: HashMap<u64, Vec<u8>>,
    deleted: HashSet<u64>,
    /// Deletes sent whose reply never came: the job may or may not be gone.
    delete_in_flight: HashSet<u64>,
}

fn producer(addr: std::net::SocketAddr, tag: String, stop: Arc<AtomicBool>) -> Acks {
    let mut acks = Acks::default();
    let Ok(mut c) = RawConn::connect(addr) else { return acks };
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        seq += 1;
        let body = format!("{tag}-{seq}").into_bytes();
        let mut cmd = format!("put 0 0 60 {}\r\n", body.len()).into_bytes();
        cmd.extend_from_slice(&body);
        cmd.extend_from_slice(b"\r\n");
        let Ok(reply) = c.roundtrip(&cmd) else { break };
        match reply.line_str().strip_prefix("INSERTED ").map(str::parse::<u64>) {
            Some(Ok(id)) => {
                acks.inserted.insert(id, body);
            }
            _ => break,
        }
    }
    acks
}

fn consumer(addr: std::net::SocketAddr, stop: Arc<AtomicBool>) -> Acks {
    let mut acks = Acks::default();
    let Ok(mut c) = RawConn::connect(addr) else { return acks };
    while !stop.load(Ordering::Relaxed) {
        let Ok(reply) = c.roundtrip(b"reserve-with-timeout 1\r\n") else { break };
        let text = reply.line_str();
        let Some(id) =
            text.strip_prefix("RESERVED ").and_then(|r| r.split(' ').next()).and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        match c.roundtrip(format!("delete {id}\r\n").as_bytes()) {
            Ok(r) if r.line_str() == "DELETED" => {
                acks.deleted.insert(id);
            }
            _ => {
                acks.delete_in_flight.insert(id);
                break;
            }
        }
    }
    acks
}

/// How a kill-under-load run is set up.
struct KillRun<'a> {
    rounds: u64,
    producers: usize,
    consumers: usize,
    /// Environment of the killed servers (fault injection).
    env: &'a [(&'a str, &'a str)],
    /// Flags of the killed servers beyond `-b DIR -f 0`.
    args: &'a [&'a str],
}

/// What the runs of [`kill_under_load`] saw.
struct KillReport {
    inserted: usize,
    deleted: usize,
    in_flight: usize,
    /// The most turns the writer had in flight at once, as `polaris-stats` reported.
    most_in_flight: u64,
}

/// Samples `commits-in-flight` from `polaris-stats` until `stop`, and returns the largest.
fn sample_in_flight(addr: std::net::SocketAddr, stop: Arc<AtomicBool>) -> u64 {
    let Ok(mut c) = RawConn::connect(addr) else { return 0 };
    let mut most = 0;
    while !stop.load(Ordering::Relaxed) {
        let Ok(reply) = c.roundtrip(b"polaris-stats\r\n") else { break };
        let body = String::from_utf8_lossy(reply.body.as_deref().unwrap_or_default()).into_owned();
        let now = body
            .lines()
            .find_map(|l| l.strip_prefix("commits-in-flight: "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
        most = most.max(now);
    }
    most
}

/// Producers and consumers run against `-f 0` with `run.env`; the server is SIGKILLed
/// mid-load `run.rounds` times. Every job acknowledged INSERTED and not acknowledged
/// DELETED must be there exactly once with its body; every acknowledged delete must stick.
fn kill_under_load(run: &KillRun<'_>) -> Result<KillReport> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().to_str().context("temp dir path is not UTF-8")?;
    let mut inserted: HashMap<u64, Vec<u8>> = HashMap::new();
    let mut deleted: HashSet<u64> = HashSet::new();
    let mut in_flight: HashSet<u64> = HashSet::new();
    let mut most_in_flight = 0;
    for round in 0..run.rounds {
        let args: Vec<&str> = ["-b", db, "-f", "0"].iter().chain(run.args).copied().collect();
        let server = polaris_testkit::spawn_announcing_with_env(&polaris_testkit::binary("polarisd"), &args, run.env)?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for p in 0..run.producers {
            let (addr, stop, tag) = (server.addr(), Arc::clone(&stop), format!("r{round}p{p}"));
            threads.push(thread::spawn(move || producer(addr, tag, stop)));
        }
        for _ in 0..run.consumers {
            let (addr, stop) = (server.addr(), Arc::clone(&stop));
            threads.push(thread::spawn(move || consumer(addr, stop)));
        }
        let sampler = {
            let (addr, stop) = (server.addr(), Arc::clone(&stop));
            thread::spawn(move || sample_in_flight(addr, stop))
        };
        thread::sleep(Duration::from_millis(120 + 17 * round));
        drop(server); // SIGKILL mid-load
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            let acks = t.join().expect("load thread panicked");
            inserted.extend(acks.inserted);
            deleted.extend(acks.deleted);
            in_flight.extend(acks.delete_in_flight);
        }
        most_in_flight = most_in_flight.max(sampler.join().expect("sampler panicked"));
    }
    ensure!(inserted.len() > 100, "the load generated too little work to mean anything: {}", inserted.len());

    let server = start(dir.path(), &["-f", "0"])?;
    let mut c = server.connect()?;
    let max_id = inserted.keys().chain(deleted.iter()).copied().max().unwrap_or(0);
    let mut seen_bodies = HashSet::new();
    let mut lost = Vec::new();
    let mut resurrected = Vec::new();
    for id in 1..=max_id + 10 {
        let reply = c.roundtrip(format!("peek {id}\r\n").as_bytes())?;
        match reply.body {
            Some(body) => {
                ensure!(seen_bodies.insert(body.clone()), "body of job {id} appears twice");
                if let Some(expected) = inserted.get(&id) {
                    ensure!(&body == expected, "job {id} has the wrong body");
                }
                if deleted.contains(&id) {
                    resurrected.push(id);
                }
            }
            None => {
                if inserted.contains_key(&id) && !deleted.contains(&id) && !in_flight.contains(&id) {
                    lost.push(id);
                }
            }
        }
    }
    ensure!(lost.is_empty(), "{} acknowledged jobs lost: {:?}", lost.len(), &lost[..lost.len().min(20)]);
    ensure!(resurrected.is_empty(), "acknowledged deletes undone: {resurrected:?}");
    Ok(KillReport { inserted: inserted.len(), deleted: deleted.len(), in_flight: in_flight.len(), most_in_flight })
}

#[test]
fn sigkill_under_load_loses_nothing() -> Result<()> {
    let report = kill_under_load(&KillRun { rounds: 20, producers: 3, consumers: 2, env: &[], args: &[] })?;
    eprintln!(
        "crash test: {} acknowledged puts, {} acknowledged deletes, {} deletes in flight at a kill, 20 kills, 0 lost",
        report.inserted, report.deleted, report.in_flight
    );
    Ok(())
}

/// As above, on a disk made slow (every commit first sleeps 15 ms) and with every commit
/// handed to the writer (none on the loop), so that turns queue up in the commit pipeline
/// and the kills land while several are handed over and not yet durable: what was
/// acknowledged survives, and what was not may or may not.
#[test]
fn sigkill_with_commits_queued_in_the_pipeline_loses_nothing() -> Result<()> {
    let env = [(polarisd::store::SLOW_COMMITS_ENV, "15")];
    let args = ["--inline-commit-below", "0"];
    let report = kill_under_load(&KillRun { rounds: 8, producers: 12, consumers: 4, env: &env, args: &args })?;
    eprintln!(
        "pipeline crash test: {} acknowledged puts, {} acknowledged deletes, up to {} turns in flight, 8 kills, 0 lost",
        report.inserted, report.deleted, report.most_in_flight
    );
    ensure!(report.most_in_flight >= 2, "commits never queued up: at most {} in flight", report.most_in_flight);
    Ok(())
}

#[test]
fn a_file_that_is_not_a_database_is_refused_and_left_alone() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("polaris.db");
    let garbage = b"this is certainly not an SQLite database, just some bytes\n".repeat(100);
    std::fs::write(&db, &garbage)?;
    let (ok, output) = run_to_exit(&["-b", dir.path().to_str().context("path")?])?;
    assert!(!ok, "polarisd must exit non-zero");
    assert!(output.contains(&db.display().to_string()), "message names the file: {output}");
    assert_eq!(std::fs::read(&db)?, garbage, "the file is left untouched");
    Ok(())
}

#[test]
fn a_newer_schema_is_refused_and_left_alone() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("polaris.db");
    {
        let conn = rusqlite::Connection::open(&db)?;
        conn.execute_batch("CREATE TABLE future (x); PRAGMA user_version = 99;")?;
    }
    let before = std::fs::read(&db)?;
    let (ok, output) = run_to_exit(&["-b", dir.path().to_str().context("path")?])?;
    assert!(!ok);
    assert!(output.contains("newer") && output.contains(&db.display().to_string()), "{output}");
    assert_eq!(std::fs::read(&db)?, before);
    Ok(())
}

#[test]
fn a_truncated_database_is_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    {
        let server = start(dir.path(), &["-f", "0"])?;
        let mut c = server.connect()?;
        for _ in 0..200 {
            c.line(&format!("put 0 0 1 1000\r\n{}\r\n", "x".repeat(1000)))?;
        }
        server.signal("TERM")?;
        thread::sleep(Duration::from_millis(300));
    }
    // Fold the WAL in, then cut the file in half.
    let db = dir.path().join("polaris.db");
    {
        let conn = rusqlite::Connection::open(&db)?;
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        conn.execute_batch("PRAGMA journal_mode = DELETE")?;
    }
    let bytes = std::fs::read(&db)?;
    std::fs::write(&db, &bytes[..bytes.len() / 2])?;
    let damaged = std::fs::read(&db)?;
    let (ok, output) = run_to_exit(&["-b", dir.path().to_str().context("path")?])?;
    assert!(!ok, "a damaged database must be refused: {output}");
    assert!(output.contains(&db.display().to_string()), "{output}");
    assert_eq!(std::fs::read(&db)?, damaged);
    Ok(())
}

#[test]
fn a_second_server_on_the_same_directory_refuses_to_start() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let _first = start(dir.path(), &[])?;
    let (ok, output) = run_to_exit(&["-b", dir.path().to_str().context("path")?])?;
    assert!(!ok);
    assert!(output.contains("another polarisd"), "{output}");
    Ok(())
}

/// A full disk (simulated with `--max-db-bytes`) makes commits fail: the
/// affected commands answer INTERNAL_ERROR, the server keeps serving, and every
/// job acknowledged before is still there after a restart.
#[test]
fn a_full_disk_answers_errors_and_loses_nothing_acknowledged() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let body = "y".repeat(20_000);
    let mut acked = Vec::new();
    {
        let server = start(dir.path(), &["-f", "0", "--max-db-bytes", "400000"])?;
        let mut c = server.connect()?;
        let mut errors = 0;
        for _ in 0..60 {
            let reply = c.line(&format!("put 0 0 60 {}\r\n{body}\r\n", body.len()))?;
            match reply.strip_prefix("INSERTED ") {
                Some(id) => acked.push(id.parse::<u64>()?),
                None => {
                    // Refused for want of space, as beanstalkd refuses a put whose binlog
                    // space it cannot reserve.
                    assert_eq!(reply, "OUT_OF_MEMORY");
                    errors += 1;
                }
            }
        }
        assert!(errors > 0, "the size bound was never reached");
        assert!(!acked.is_empty());
        // Still serving: statistics answer, and the failed puts left no job behind.
        let stats = c.roundtrip(b"stats\r\n")?;
        let text = String::from_utf8_lossy(stats.body.as_deref().unwrap_or_default()).into_owned();
        assert!(text.contains(&format!("current-jobs-ready: {}\n", acked.len())), "{text}");
        // Deleting makes room again.
        assert_eq!(c.line(&format!("delete {}\r\n", acked[0]))?, "DELETED");
        let deleted = acked.remove(0);
        let reply = c.line(&format!("put 0 0 60 {}\r\n{body}\r\n", body.len()))?;
        assert!(reply.starts_with("INSERTED "), "{reply}");
        acked.push(reply["INSERTED ".len()..].parse()?);
        assert_eq!(c.line(&format!("peek {deleted}\r\n"))?, "NOT_FOUND");
    }
    let server = start(dir.path(), &[])?;
    let mut c = server.connect()?;
    for id in &acked {
        let reply = c.roundtrip(format!("peek {id}\r\n").as_bytes())?;
        assert_eq!(reply.body.as_deref(), Some(body.as_bytes()), "job {id}");
    }
    Ok(())
}

fn dir_size(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        total += entry?.metadata()?.len();
    }
    Ok(total)
}

/// Deleted jobs leave the file: 1,000,000 put/delete cycles, in batches of
/// 1,000 puts then 1,000 deletes (so every job really reaches the database in
/// one turn and leaves it in another), leave the files under 10 MB once the
/// server is idle; while it runs they stay bounded by the WAL size (`-s`).
#[test]
fn a_million_put_delete_cycles_leave_the_files_small() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = start(dir.path(), &[])?;
    let mut c = server.connect()?;
    let body = "z".repeat(100);
    let put = format!("put 0 0 60 100\r\n{body}\r\n").repeat(1000);
    let mut peak = 0;
    for batch in 0..1000u64 {
        c.send(put.as_bytes())?;
        let first = batch * 1000 + 1;
        for i in first..first + 1000 {
            assert_eq!(c.read_reply()?.line_str(), format!("INSERTED {i}"));
        }
        let deletes: String = (first..first + 1000).map(|i| format!("delete {i}\r\n")).collect();
        c.send(deletes.as_bytes())?;
        for _ in 0..1000 {
            assert_eq!(c.read_reply()?.line_str(), "DELETED");
        }
        if batch % 100 == 99 {
            peak = peak.max(dir_size(dir.path())?);
        }
    }
    // A quiet server folds its WAL into the database and gives pages back. The WAL file keeps
    // the size it is written out to (`-s`, 10 MiB by default), or the size it grew to when
    // checkpoints fell behind the load, until the next commit trims it back to `-s`.
    thread::sleep(Duration::from_millis(2500));
    let size = dir_size(dir.path())?;
    let db = std::fs::metadata(dir.path().join("polaris.db"))?.len();
    let wal = std::fs::metadata(dir.path().join("polaris.db-wal"))?.len();
    eprintln!(
        "1,000,000 put/delete cycles: peak {peak} bytes on disk while running; once idle {size} bytes, \
         of which the database {db} and the WAL {wal}"
    );
    // While running, the WAL outgrows `-s` when checkpoints fall behind: 13–16 MB in all on
    // a quiet machine, 43 MB once with the crash tests hammering the same disk in parallel.
    assert!(peak < 64 * 1024 * 1024, "the files grew to {peak} bytes while running");
    assert!(db < 8 * 1024 * 1024, "the database holds {db} bytes after the cycles");
    assert!(wal <= peak, "the WAL grew to {wal} bytes while idle");
    Ok(())
}

/// Puts `jobs` jobs in batches of 100 pipelined puts (so the WAL holds many commits) and
/// SIGKILLs the server before it goes idle and folds its WAL into the database.
fn fill_wal_and_kill(dir: &Path, jobs: usize) -> Result<()> {
    let server = start(dir, &["-f", "0", "-s", "1000000000"])?;
    let mut c = server.connect()?;
    for batch in 0..jobs / 100 {
        let mut bytes = Vec::new();
        for i in 0..100 {
            let body = format!("job-{:05}", batch * 100 + i);
            bytes.extend_from_slice(format!("put 0 0 60 {}\r\n{body}\r\n", body.len()).as_bytes());
        }
        c.send(&bytes)?;
        for _ in 0..100 {
            let reply = c.read_reply()?;
            ensure!(reply.line_str().starts_with("INSERTED"), "{}", reply.line_str());
        }
    }
    drop(server); // SIGKILL, well within the second after which an idle store folds its WAL
    Ok(())
}

#[test]
fn a_damaged_wal_is_refused_unless_salvaged() -> Result<()> {
    let dir = tempfile::tempdir()?;
    fill_wal_and_kill(dir.path(), 2000)?;
    let wal = dir.path().join("polaris.db-wal");
    let mut bytes = std::fs::read(&wal)?;
    // The middle of the frames, not of the file: the file goes on with zeros written ahead.
    let report = polarisd::wal::inspect(&bytes).context("the WAL has no header")?;
    let frames_end = 32 + report.valid_frames as usize * (24 + 1024);
    ensure!(frames_end > 100_000, "the WAL holds too little to damage its middle: {frames_end} bytes");
    let middle = frames_end / 2;
    bytes[middle] ^= 0x55;
    bytes[middle + 1] ^= 0x55;
    std::fs::write(&wal, &bytes)?;
    let db_before = std::fs::read(dir.path().join("polaris.db"))?;

    let dir_arg = dir.path().to_str().context("utf-8")?;
    let (ok, output) = run_to_exit(&["-b", dir_arg])?;
    ensure!(!ok, "polarisd started on a damaged WAL: {output}");
    ensure!(output.contains("damaged") && output.contains("--salvage"), "unclear refusal: {output}");
    assert_eq!(std::fs::read(&wal)?, bytes, "the refused WAL was changed");
    assert_eq!(std::fs::read(dir.path().join("polaris.db"))?, db_before, "the refused database was changed");

    let server = start(dir.path(), &["--salvage"])?;
    let mut c = server.connect()?;
    let stats = c.roundtrip(b"stats\r\n")?;
    let text = String::from_utf8_lossy(stats.body.as_deref().unwrap_or_default()).into_owned();
    let ready: usize =
        text.lines().find_map(|l| l.strip_prefix("current-jobs-ready: ")).context("current-jobs-ready")?.parse()?;
    ensure!(ready < 2000, "salvage kept {ready} jobs, the damage should have cost some");
    let copies = std::fs::read_dir(dir.path())?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("polaris.db-wal.damaged-"))
        .count();
    assert_eq!(copies, 1, "the damaged WAL was not kept aside");
    Ok(())
}

#[test]
fn an_empty_database_file_is_refused_unless_salvaged() -> Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("polaris.db"), b"")?;
    let dir_arg = dir.path().to_str().context("utf-8")?;
    let (ok, output) = run_to_exit(&["-b", dir_arg])?;
    ensure!(!ok && output.contains("empty"), "an empty database file was not refused: {output}");
    let server = start(dir.path(), &["--salvage"])?;
    let mut c = server.connect()?;
    assert_eq!(c.line("put 0 0 60 1\r\nx\r\n")?, "INSERTED 1");
    Ok(())
}

#[test]
fn an_unreadable_row_is_named_by_table_row_and_column() -> Result<()> {
    let dir = tempfile::tempdir()?;
    {
        let server = start(dir.path(), &["-f", "0"])?;
        let mut c = server.connect()?;
        assert_eq!(c.line("put 5 0 60 1\r\nx\r\n")?, "INSERTED 1");
        server.signal("TERM")?;
        thread::sleep(Duration::from_millis(300));
    }
    let db = rusqlite::Connection::open(dir.path().join("polaris.db"))?;
    db.execute("UPDATE jobs SET pri = -5 WHERE id = 1", [])?;
    drop(db);
    let dir_arg = dir.path().to_str().context("utf-8")?;
    let (ok, output) = run_to_exit(&["-b", dir_arg])?;
    ensure!(!ok, "polarisd started with a negative priority");
    ensure!(output.contains("table jobs, the row with id 1, column pri"), "the error does not say where: {output}");
    Ok(())
}

/// Reads the `stats` field `name` as a number.
fn stat(c: &mut RawConn, name: &str) -> Result<u64> {
    let reply = c.roundtrip(b"stats\r\n")?;
    let text = String::from_utf8_lossy(reply.body.as_deref().unwrap_or_default()).into_owned();
    let value =
        text.lines().find_map(|l| l.strip_prefix(&format!("{name}: "))).with_context(|| format!("no {name}"))?;
    Ok(value.trim().parse()?)
}

/// One write of 60 pipelined puts against a store that fills up in the middle of them:
/// every put gets exactly one reply, each reply is true, and what was acknowledged is kept.
#[test]
fn a_failed_commit_answers_every_pipelined_command_once() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let body = "z".repeat(10_000);
    let mut acked = Vec::new();
    {
        let server = start(dir.path(), &["-f", "0", "--max-db-bytes", "300000"])?;
        let mut c = server.connect()?;
        let mut batch = Vec::new();
        for _ in 0..60 {
            batch.extend_from_slice(format!("put 0 0 10 {}\r\n{body}\r\n", body.len()).as_bytes());
        }
        c.send(&batch)?;
        let mut refused = 0;
        for n in 0..60 {
            let reply = c.read_reply().with_context(|| format!("reply {n} of 60"))?.line_str();
            match reply.strip_prefix("INSERTED ") {
                Some(id) => acked.push(id.parse::<u64>()?),
                None => {
                    assert_eq!(reply, "OUT_OF_MEMORY", "reply {n}");
                    refused += 1;
                }
            }
        }
        assert!(refused > 0 && !acked.is_empty(), "the bound was not reached mid-batch: {refused} refused");
        assert_eq!(c.line("list-tube-used\r\n")?, "USING default", "a reply too many");
        assert_eq!(stat(&mut c, "cmd-put")?, 60);
        assert_eq!(stat(&mut c, "current-jobs-ready")?, acked.len() as u64);
        drop(server);
    }
    let server = start(dir.path(), &[])?;
    let mut c = server.connect()?;
    assert_eq!(stat(&mut c, "current-jobs-ready")?, acked.len() as u64);
    for id in &acked {
        let reply = c.roundtrip(format!("peek {id}\r\n").as_bytes())?;
        assert_eq!(reply.body.as_deref(), Some(body.as_bytes()), "job {id}");
    }
    Ok(())
}

/// On a full store, what reads or frees keeps working and says what happened: statistics,
/// peeks, reserves, deletes; and a delete that answered DELETED stays deleted.
#[test]
fn a_full_store_keeps_reading_and_freeing_truthfully() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let body = "f".repeat(20_000);
    let deleted;
    {
        let server = start(dir.path(), &["-f", "0", "--max-db-bytes", "400000"])?;
        let mut c = server.connect()?;
        loop {
            let reply = c.line(&format!("put 0 0 60 {}\r\n{body}\r\n", body.len()))?;
            if reply == "OUT_OF_MEMORY" {
                break;
            }
            ensure!(reply.starts_with("INSERTED "), "{reply}");
        }
        assert!(c.roundtrip(b"stats\r\n")?.line_str().starts_with("OK "));
        assert_eq!(c.line("list-tube-used\r\n")?, "USING default");
        assert!(c.roundtrip(b"peek-ready\r\n")?.line_str().starts_with("FOUND 1 "));
        let reserved = c.roundtrip(b"reserve-with-timeout 0\r\n")?.line_str();
        assert!(reserved.starts_with("RESERVED 1 "), "{reserved}");
        assert_eq!(c.line("delete 1\r\n")?, "DELETED");
        assert_eq!(c.line("delete 2\r\n")?, "DELETED");
        deleted = [1u64, 2];
        assert_eq!(c.line("job-state 1\r\n")?, "STATE success");
        drop(server); // SIGKILL: what was acknowledged must be what the restart finds
    }
    let server = start(dir.path(), &[])?;
    let mut c = server.connect()?;
    for id in deleted {
        assert_eq!(c.line(&format!("peek {id}\r\n"))?, "NOT_FOUND", "job {id} came back after DELETED");
    }
    assert!(c.roundtrip(b"peek 3\r\n")?.line_str().starts_with("FOUND 3 "));
    Ok(())
}

/// A body SQLite could never store is refused when the server starts, not at every commit.
#[test]
fn a_job_size_the_store_cannot_keep_is_refused_at_start() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let dir_arg = dir.path().to_str().context("utf-8")?;
    let (ok, output) = run_to_exit(&["-b", dir_arg, "-z", "1073741824"])?;
    ensure!(!ok && output.contains("-z"), "-z over SQLite's limit was accepted: {output}");
    Ok(())
}

/// A real full disk: the store lives on a 4 MiB tmpfs of its own (a private mount
/// namespace, so nothing of the machine is touched), filled up with a ballast file.
/// Pipelined puts each get one reply (`OUT_OF_MEMORY` once the disk is full); reads and
/// deletes keep working on the full disk and say what happened (a delete that cannot be
/// committed is answered once it is); with room made, puts are accepted again.
#[test]
fn a_really_full_disk_refuses_puts_and_keeps_reading_and_deleting() -> Result<()> {
    let probe = Command::new("unshare").args(["--mount", "true"]).stderr(Stdio::null()).status();
    if !probe.is_ok_and(|s| s.success()) {
        polaris_testkit::skip_unless_ci("the real full-disk test needs `unshare --mount` (run as root)");
        return Ok(());
    }
    let mount = tempfile::tempdir()?;
    let store = mount.path().to_str().context("utf-8")?.to_string();
    let port = polaris_testkit::free_port()?;
    // The ballast takes what the database has not; removing it frees room again.
    let script = format!(
        "mount -t tmpfs -o size=4m tmpfs {store} && mkdir {store}/db && \
         (head -c 2500000 /dev/zero > {store}/ballast || true) && \
         exec {} -l 127.0.0.1 -p {port} -f 0 -b {store}/db",
        polaris_testkit::binary("polarisd").display()
    );
    let child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let server = polaris_testkit::Proc::new("polarisd on a small tmpfs", child);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
    polaris_testkit::wait_accepting(&addr.to_string(), Duration::from_secs(10));
    let mut c = RawConn::connect(addr)?;
    let body = "d".repeat(50_000);
    let mut acked = Vec::new();
    // Fill the rest of the disk, 20 pipelined puts at a time.
    for _round in 0..20 {
        let mut batch = Vec::new();
        for _ in 0..20 {
            batch.extend_from_slice(format!("put 0 0 60 {}\r\n{body}\r\n", body.len()).as_bytes());
        }
        c.send(&batch)?;
        let mut refused = 0;
        for n in 0..20 {
            let reply = c.read_reply().with_context(|| format!("reply {n} of 20; {}", server.output()))?.line_str();
            match reply.strip_prefix("INSERTED ") {
                Some(id) => acked.push(id.parse::<u64>()?),
                None => {
                    assert_eq!(reply, "OUT_OF_MEMORY");
                    refused += 1;
                }
            }
        }
        if refused == 20 {
            break;
        }
    }
    ensure!(!acked.is_empty(), "nothing fitted: {}", server.output());
    assert_eq!(c.line("list-tube-used\r\n")?, "USING default", "the replies do not line up");
    // Reads answer at once, full disk or not.
    assert!(c.roundtrip(b"stats\r\n")?.line_str().starts_with("OK "));
    // Once idle, the store folds its log into the database and truncates it; then the
    // space that freed is filled too, so that the next commit cannot write its log.
    thread::sleep(Duration::from_millis(1500));
    let pid = server.pid().to_string();
    let in_namespace = |command: &str| {
        Command::new("nsenter").args(["-t", &pid, "-m", "sh", "-c", command]).stderr(Stdio::null()).status()
    };
    in_namespace(&format!("head -c 8000000 /dev/zero > {store}/filler"))?;
    // Deletes free space, and on a full disk they usually commit (the log has room left by
    // the failed puts). When one cannot, its DELETED is held until room is made: never an
    // error for a delete that then happens, never a DELETED for one that did not.
    let mut room_made = false;
    for id in &acked {
        c.send(format!("delete {id}\r\n").as_bytes())?;
        let reply = match c.read_reply_within(Duration::from_secs(2))? {
            Some(reply) => reply,
            None => {
                ensure!(!room_made, "delete {id} waits although there is room");
                ensure!(in_namespace(&format!("rm {store}/ballast {store}/filler"))?.success(), "could not free room");
                room_made = true;
                c.read_reply()?
            }
        };
        assert_eq!(reply.line_str(), "DELETED", "job {id}");
        assert_eq!(c.line(&format!("peek {id}\r\n"))?, "NOT_FOUND");
    }
    // With room made, puts are accepted again.
    if !room_made {
        ensure!(in_namespace(&format!("rm {store}/ballast {store}/filler"))?.success(), "could not free room");
    }
    let reply = c.line(&format!("put 0 0 60 {}\r\n{body}\r\n", body.len()))?;
    assert!(reply.starts_with("INSERTED "), "{reply}");
    drop(c);
    drop(server);
    Ok(())
}

/// When even the retry of a failed commit fails, a reply that reports a change is held
/// (never written, never replaced) until a commit succeeds; reads answer meanwhile, and a
/// put's failure is reported as such. The failure is injected (see `FAIL_COMMITS_ENV`):
/// a real disk lets deletes through, as the test above shows.
#[test]
fn a_reply_that_reports_a_change_waits_for_its_commit() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("db");
    let flag = dir.path().join("fail");
    {
        let server = start_with_fault(&db, polarisd::store::FAIL_COMMITS_ENV, &flag)?;
        let mut a = server.connect()?;
        let mut b = server.connect()?;
        for id in 1..=3 {
            assert_eq!(a.line("put 0 0 60 1\r\nx\r\n")?, format!("INSERTED {id}"));
        }
        std::fs::write(&flag, b"")?;
        a.send(b"delete 1\r\nlist-tube-used\r\n")?;
        assert!(a.read_reply_within(Duration::from_millis(500))?.is_none(), "a DELETED was sent before its commit");
        // Another connection: reads answer, and a put is refused, truthfully.
        assert!(b.roundtrip(b"peek 2\r\n")?.line_str().starts_with("FOUND 2 "));
        assert_eq!(b.line("put 0 0 60 1\r\ny\r\n")?, "INTERNAL_ERROR");
        assert!(a.read_reply_within(Duration::from_millis(300))?.is_none(), "a held reply leaked");
        std::fs::remove_file(&flag)?;
        assert_eq!(a.read_reply()?.line_str(), "DELETED");
        assert_eq!(a.read_reply()?.line_str(), "USING default");
        drop(server); // SIGKILL
    }
    let server = start(&db, &[])?;
    let mut c = server.connect()?;
    assert_eq!(c.line("peek 1\r\n")?, "NOT_FOUND");
    assert!(c.roundtrip(b"peek 3\r\n")?.line_str().starts_with("FOUND 3 "));
    assert_eq!(c.line("peek 4\r\n")?, "NOT_FOUND", "the refused put left a job");
    Ok(())
}

/// Under `-f 0` the store fsyncs the WAL itself after SQLite has committed. When that
/// fsync fails, the commit is in the WAL but maybe not on the disk: the put is refused
/// (`INTERNAL_ERROR`, and so is the reserve that was to hand its job out), and the job's
/// row, which SQLite does hold, is deleted again, so that a restart does not bring back a
/// job that was refused.
/// The failure is injected (see `FAIL_SYNCS_ENV`).
#[test]
fn a_failed_wal_fsync_refuses_the_put_and_leaves_no_job_behind() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("db");
    let flag = dir.path().join("fail");
    {
        let server = start_with_fault(&db, polarisd::store::FAIL_SYNCS_ENV, &flag)?;
        let mut producer = server.connect()?;
        let mut worker = server.connect()?;
        assert_eq!(producer.line("put 0 0 60 6\r\nbefore\r\n")?, "INSERTED 1");
        assert!(worker.roundtrip(b"reserve\r\n")?.line_str().starts_with("RESERVED 1 "));
        worker.send(b"reserve\r\n")?;
        std::fs::write(&flag, b"")?;
        assert_eq!(producer.line("put 0 0 60 5\r\nafter\r\n")?, "INTERNAL_ERROR");
        // The reserve that would have handed the job out gets its one reply: an error.
        assert_eq!(worker.read_reply()?.line_str(), "INTERNAL_ERROR");
        std::fs::remove_file(&flag)?;
        assert_eq!(producer.line("put 0 0 60 5\r\nlater\r\n")?, "INSERTED 3");
        let handed = worker.roundtrip(b"reserve\r\n")?;
        assert_eq!((handed.line_str().as_str(), handed.body.as_deref()), ("RESERVED 3 5", Some(&b"later"[..])));
        drop(server); // SIGKILL
    }
    let server = start(&db, &["-f", "0"])?;
    let mut c = server.connect()?;
    assert!(c.roundtrip(b"peek 1\r\n")?.line_str().starts_with("FOUND 1 "));
    assert_eq!(c.line("peek 2\r\n")?, "NOT_FOUND", "the refused put's job came back");
    assert!(c.roundtrip(b"peek 3\r\n")?.line_str().starts_with("FOUND 3 "));
    Ok(())
}
