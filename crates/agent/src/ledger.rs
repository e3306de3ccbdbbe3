//! The agent's ledger: which envelopes it has run, and which run is unfinished, kept in an
//! append-only file next to the state file (`<state file>.ledger`, e.g.
//! `polaris-agent.ledger`) so that both survive restarts.
//!
//! - Before a command starts, a `ran` line (the envelope's job id, host and attempt, its
//!   expiry, the queue job id and reply tube, and a fresh run id) is appended and fsynced.
//!   An envelope whose job id, host and attempt are in the ledger is a replay: it is never
//!   run again; a retry (the next attempt) is a new key and runs. All three fields are
//!   covered by the envelope's signature, so only the dispatcher can make a new key, and
//!   the dispatcher issues one job id per job (`409` on reuse) and one row per host. Lines
//!   written before attempts existed have none, and read as attempt 1.
//! - A `cancel` line records a signed cancel (see [`crate::control`]) for a job, or one
//!   attempt of it, so that its envelope, if it comes later, is refused and never run;
//!   it is kept until its `until` (two days), then pruned.
//! - Right after the command's process group exists, a `started` line records its id, the
//!   leader's start time (clock ticks since boot, from `/proc/<pid>/stat`), the boot id
//!   and the command's cgroups, so that the next agent can tell the group is really that
//!   command's, and kill its whole cgroup.
//! - Once the result is on the queue and the job deleted, a `done` line closes the run. A
//!   run without `done` at start is one the previous agent did not finish: the next start
//!   ends and reports it (`orphans.rs`).
//!
//! `ran` entries are dropped once their envelope has expired (plus [`PRUNE_MARGIN_SECS`],
//! for a clock stepped back): an expired envelope is refused anyway. The file is rewritten
//! with the live lines at every start and when dead lines outnumber live ones, so it stays
//! bounded by the jobs of the last day (the dispatcher's longest `timeout`). A line torn by
//! a crash is ignored: its fsync had not returned, so its command never started.
//!
//! A `<state file>.lock` file, `flock`ed for the agent's lifetime, keeps a second agent
//! from using the same state (it would take the first one's running command for an orphan).

use crate::sys;
use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

/// How long past its envelope's expiry a `ran` entry is kept.
pub const PRUNE_MARGIN_SECS: u64 = 600;

/// Dead lines tolerated beyond the live ones before the file is rewritten.
const COMPACT_SLACK: usize = 1000;

/// How often (seconds) expired entries are looked for while the agent runs.
const PRUNE_EVERY_SECS: u64 = 60;

/// How long [`Ledger::open`] waits for a held lock to be released before failing.
const LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_millis(500);

/// An envelope the agent has started to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ran {
    /// The envelope's dispatch job id.
    pub job_id: String,
    /// The envelope's host.
    pub host: String,
    /// The envelope's attempt (from 1); ledgers written before attempts existed have
    /// none, which reads as 1.
    #[serde(default = "first_attempt")]
    pub attempt: u32,
    /// The envelope's method (wire name).
    pub method: String,
    /// The envelope's `expires_at` (Unix seconds).
    pub expires_at: u64,
    /// When the agent started it (Unix seconds).
    pub ran_at: u64,
    /// This run's id (also `POLARIS_RUN_ID` in the command's environment).
    pub run_id: String,
    /// The queue job that carried the envelope.
    pub queue_job_id: u64,
    /// Where the result goes.
    pub reply_tube: String,
}

fn first_attempt() -> u32 {
    1
}

/// The key of a run: one envelope is one (job id, host, attempt).
type RunKey = (String, String, u32);

fn key_of(entry: &Ran) -> RunKey {
    (entry.job_id.clone(), entry.host.clone(), entry.attempt)
}

/// The process group of a running command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Started {
    /// The run it belongs to.
    pub run_id: String,
    /// The process group id (the pid of `bash`, its leader).
    pub pgid: i32,
    /// The leader's start time, in clock ticks since boot (`/proc/<pid>/stat` field 22).
    pub start_ticks: u64,
    /// `/proc/sys/kernel/random/boot_id` when it started.
    pub boot_id: String,
    /// The cgroup directories holding the command (its containment unit first, then the
    /// cgroup v1 directories of its limits), so that the next agent kills and removes the
    /// whole unit; empty when it ran in a process group only (and in older ledgers).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cgroups: Vec<String>,
}

/// A cancel for a job that had not started here when it came: an envelope it names is
/// refused, never run, until `until`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cancelled {
    /// The dispatch job id.
    pub job_id: String,
    /// The host.
    pub host: String,
    /// The attempt cancelled; `None` cancels every attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// Unix seconds when the dispatcher issued the cancel.
    pub issued_at: u64,
    /// Unix seconds after which the entry is dropped: by then every envelope of the job
    /// has expired, and an expired envelope is refused anyway.
    pub until: u64,
}

impl Cancelled {
    /// Whether this cancel covers the envelope with this job id, host and attempt.
    pub fn covers(&self, job_id: &str, host: &str, attempt: u32) -> bool {
        self.job_id == job_id
            && self.host == host
            && match self.attempt {
                Some(cancelled) => cancelled == attempt,
                None => true,
            }
    }
}

/// A run without a `done` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnfinishedRun {
    /// What ran.
    pub ran: Ran,
    /// Its process group, if it was recorded.
    pub started: Option<Started>,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "entry", rename_all = "lowercase")]
enum Line {
    /// A run begins.
    Ran(Ran),
    /// Its process group exists.
    Started(Started),
    /// It is finished.
    Done { run_id: String },
    /// A finished run's entry, as a rewrite carries it over.
    Kept(Ran),
    /// A job cancelled before it started here.
    Cancel(Cancelled),
}

/// The ledger file, loaded.
#[derive(Debug)]
pub struct Ledger {
    path: PathBuf,
    file: File,
    ran: HashMap<RunKey, Ran>,
    unfinished: Vec<UnfinishedRun>,
    cancels: Vec<Cancelled>,
    lines: usize,
    last_prune: u64,
    _lock: File,
}

impl Ledger {
    /// The ledger of the agent whose state file is `state_file`.
    pub fn path_for(state_file: &Path) -> PathBuf {
        state_file.with_extension("ledger")
    }

    /// Locks, loads and compacts the ledger next to `state_file`, creating it if needed.
    /// Fails if another agent holds the lock.
    pub fn open(state_file: &Path, now: u64) -> anyhow::Result<Ledger> {
        let path = Ledger::path_for(state_file);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let lock_path = state_file.with_extension("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("opening {}", lock_path.display()))?;
        // A lock just released may still be held for a moment by a child forked while its
        // descriptor was open (until the child's exec closes it), or by a predecessor
        // still exiting: look again for a short while before calling it taken.
        let give_up = std::time::Instant::now() + LOCK_PATIENCE;
        while !sys::try_lock_exclusive(&lock).with_context(|| format!("locking {}", lock_path.display()))? {
            anyhow::ensure!(
                std::time::Instant::now() < give_up,
                "another polaris-agent is using the state file {} (its lock {} is held)",
                state_file.display(),
                lock_path.display()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let text = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let mut ran = HashMap::new();
        let mut unfinished: Vec<UnfinishedRun> = Vec::new();
        let mut cancels: Vec<Cancelled> = Vec::new();
        let complete = match text.iter().rposition(|&b| b == b'\n') {
            Some(end) => &text[..end + 1],
            None => &[][..],
        };
        if complete.len() < text.len() {
            log::warn!("{}: ignoring a torn last line (the agent died writing it)", path.display());
        }
        for (number, line) in complete.split(|&b| b == b'\n').enumerate().filter(|(_, l)| !l.is_empty()) {
            match serde_json::from_slice::<Line>(line) {
                Ok(Line::Ran(entry)) => {
                    unfinished.push(UnfinishedRun { ran: entry.clone(), started: None });
                    ran.insert(key_of(&entry), entry);
                }
                Ok(Line::Started(started)) => {
                    if let Some(run) = unfinished.iter_mut().find(|r| r.ran.run_id == started.run_id) {
                        run.started = Some(started);
                    }
                }
                Ok(Line::Done { run_id }) => unfinished.retain(|r| r.ran.run_id != run_id),
                Ok(Line::Kept(entry)) => {
                    ran.insert(key_of(&entry), entry);
                }
                Ok(Line::Cancel(cancel)) => cancels.push(cancel),
                Err(e) => log::warn!("{} line {}: unreadable, ignored: {e}", path.display(), number + 1),
            }
        }
        let file = open_append(&path).with_context(|| format!("opening {}", path.display()))?;
        let mut ledger = Ledger { path, file, ran, unfinished, cancels, lines: 0, last_prune: now, _lock: lock };
        ledger.prune(now);
        ledger.compact().with_context(|| format!("rewriting {}", ledger.path.display()))?;
        Ok(ledger)
    }

    /// The entry of the envelope with this job id, host and attempt, if it ran here.
    pub fn find(&self, job_id: &str, host: &str, attempt: u32) -> Option<&Ran> {
        self.ran.get(&(job_id.to_string(), host.to_string(), attempt))
    }

    /// The cancel that covers the envelope with this job id, host and attempt, if one came.
    pub fn cancelled(&self, job_id: &str, host: &str, attempt: u32) -> Option<&Cancelled> {
        self.cancels.iter().find(|c| c.covers(job_id, host, attempt))
    }

    /// Records, durably, a cancel for a job that has not started here.
    pub fn cancel(&mut self, cancel: Cancelled) -> io::Result<()> {
        // The same message again (a redelivery) adds nothing.
        let same = |c: &Cancelled| {
            (&c.job_id, &c.host, c.attempt, c.issued_at)
                == (&cancel.job_id, &cancel.host, cancel.attempt, cancel.issued_at)
        };
        if self.cancels.iter().any(same) {
            return Ok(());
        }
        self.append(&Line::Cancel(cancel.clone()))?;
        self.cancels.push(cancel);
        Ok(())
    }

    /// The runs the previous agent left without a `done` line.
    pub fn unfinished(&self) -> &[UnfinishedRun] {
        &self.unfinished
    }

    /// How many envelopes the ledger remembers.
    pub fn len(&self) -> usize {
        self.ran.len()
    }

    /// Whether the ledger remembers no envelope.
    pub fn is_empty(&self) -> bool {
        self.ran.is_empty()
    }

    /// Records, durably, that `entry` is about to run. Only once this returns may it run.
    pub fn begin(&mut self, entry: Ran) -> io::Result<()> {
        self.append(&Line::Ran(entry.clone()))?;
        self.unfinished.push(UnfinishedRun { ran: entry.clone(), started: None });
        self.ran.insert(key_of(&entry), entry);
        Ok(())
    }

    /// Records, durably, the process group of a running command.
    pub fn started(&mut self, started: Started) -> io::Result<()> {
        self.append(&Line::Started(started.clone()))?;
        if let Some(run) = self.unfinished.iter_mut().find(|r| r.ran.run_id == started.run_id) {
            run.started = Some(started);
        }
        Ok(())
    }

    /// Records that run `run_id` is finished: its result is on the queue, its job deleted.
    /// Now and then also drops expired entries and rewrites the file.
    pub fn done(&mut self, run_id: &str, now: u64) -> io::Result<()> {
        self.append(&Line::Done { run_id: run_id.to_string() })?;
        self.unfinished.retain(|r| r.ran.run_id != run_id);
        if now >= self.last_prune + PRUNE_EVERY_SECS {
            self.prune(now);
        }
        if self.lines > 2 * self.live_lines() + COMPACT_SLACK {
            self.compact()?;
        }
        Ok(())
    }

    fn live_lines(&self) -> usize {
        self.ran.len() + self.cancels.len() + self.unfinished.iter().filter(|r| r.started.is_some()).count()
    }

    /// Forgets envelopes expired more than [`PRUNE_MARGIN_SECS`] ago (not unfinished ones),
    /// and cancels past their `until`.
    fn prune(&mut self, now: u64) {
        self.cancels.retain(|c| c.until >= now);
        let unfinished = &self.unfinished;
        self.ran.retain(|_, entry| {
            entry.expires_at.saturating_add(PRUNE_MARGIN_SECS) >= now
                || unfinished.iter().any(|r| r.ran.run_id == entry.run_id)
        });
        self.last_prune = now;
    }

    /// Rewrites the file with the live lines only (write, fsync, rename, fsync the
    /// directory), then appends to the new file.
    fn compact(&mut self) -> io::Result<()> {
        let mut entries: Vec<&Ran> = self.ran.values().collect();
        entries.sort_by(|a, b| (a.ran_at, &a.run_id).cmp(&(b.ran_at, &b.run_id)));
        let mut text = Vec::new();
        let mut lines = 0;
        for entry in entries {
            let unfinished = self.unfinished.iter().any(|r| r.ran.run_id == entry.run_id);
            let line = if unfinished { Line::Ran(entry.clone()) } else { Line::Kept(entry.clone()) };
            text.extend_from_slice(&line_bytes(&line)?);
            lines += 1;
        }
        for cancel in &self.cancels {
            text.extend_from_slice(&line_bytes(&Line::Cancel(cancel.clone()))?);
            lines += 1;
        }
        for started in self.unfinished.iter().filter_map(|r| r.started.clone()) {
            text.extend_from_slice(&line_bytes(&Line::Started(started))?);
            lines += 1;
        }
        let tmp = self.path.with_extension("ledger.tmp");
        {
            let mut file = File::create(&tmp)?;
            file.write_all(&text)?;
            file.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        self.file = open_append(&self.path)?;
        self.lines = lines;
        Ok(())
    }

    fn append(&mut self, line: &Line) -> io::Result<()> {
        self.file.write_all(&line_bytes(line)?)?;
        self.file.sync_data()?;
        self.lines += 1;
        Ok(())
    }
}

fn line_bytes(line: &Line) -> io::Result<Vec<u8>> {
    let mut bytes = serde_json::to_vec(line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    bytes.push(b'\n');
    Ok(bytes)
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(job_id: &str, run_id: &str, expires_at: u64) -> Ran {
        Ran {
            job_id: job_id.into(),
            host: "web-01".into(),
            attempt: 1,
            method: "sync.bash".into(),
            expires_at,
            ran_at: 1000,
            run_id: run_id.into(),
            queue_job_id: 7,
            reply_tube: "polaris.results".into(),
        }
    }

    #[test]
    fn entries_survive_a_restart_and_unfinished_runs_are_found() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state/agent.json");
        {
            let mut ledger = Ledger::open(&state, 1000).expect("open");
            ledger.begin(entry("a", "r1", 2000)).expect("begin");
            ledger.done("r1", 1001).expect("done");
            ledger.begin(entry("b", "r2", 2000)).expect("begin");
            let started = Started {
                run_id: "r2".into(),
                pgid: 4242,
                start_ticks: 99,
                boot_id: "boot".into(),
                cgroups: vec!["/sys/fs/cgroup/polaris-agent/r2".into()],
            };
            ledger.started(started).expect("started");
            // Dropped without `done` for r2, as if the agent died.
        }
        // Twice: the first open rewrites the file, the second reads the rewritten one.
        for _ in 0..2 {
            let ledger = Ledger::open(&state, 1002).expect("reopen");
            assert!(ledger.find("a", "web-01", 1).is_some());
            assert!(ledger.find("b", "web-01", 1).is_some());
            assert!(ledger.find("a", "web-02", 1).is_none());
            assert_eq!(ledger.unfinished().len(), 1);
            assert_eq!(ledger.unfinished()[0].ran.run_id, "r2");
            assert_eq!(ledger.unfinished()[0].started.as_ref().map(|s| s.pgid), Some(4242));
            let cgroups = ledger.unfinished()[0].started.as_ref().map(|s| s.cgroups.clone()).unwrap_or_default();
            assert_eq!(cgroups, ["/sys/fs/cgroup/polaris-agent/r2"]);
        }
        let mut ledger = Ledger::open(&state, 1002).expect("reopen");
        ledger.done("r2", 1003).expect("done");
        drop(ledger);
        assert!(Ledger::open(&state, 1004).expect("reopen").unfinished().is_empty());
        assert_eq!(Ledger::path_for(&state), dir.path().join("state/agent.ledger"));
    }

    #[test]
    fn a_second_agent_on_the_same_state_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("agent.json");
        let first = Ledger::open(&state, 1).expect("open");
        let error = Ledger::open(&state, 1).expect_err("locked").to_string();
        assert!(error.contains("another polaris-agent"), "{error}");
        drop(first);
        Ledger::open(&state, 1).expect("free again");
    }

    #[test]
    fn expired_entries_are_pruned_and_the_file_stays_bounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("agent.json");
        let mut ledger = Ledger::open(&state, 1000).expect("open");
        for n in 0..1200 {
            let run_id = format!("r{n}");
            ledger.begin(entry(&format!("j{n}"), &run_id, 1000 + n)).expect("begin");
            ledger.done(&run_id, 1000 + n).expect("done");
        }
        // Entries expired more than the margin ago are gone; recent ones are kept.
        assert!(ledger.find("j0", "web-01", 1).is_none());
        assert!(ledger.find("j1199", "web-01", 1).is_some());
        let lines = std::fs::read_to_string(Ledger::path_for(&state)).expect("read").lines().count();
        assert!(lines <= 2 * ledger.len() + COMPACT_SLACK, "{lines} lines for {} entries", ledger.len());
        drop(ledger);
        let ledger = Ledger::open(&state, 2000).expect("reopen");
        assert!(ledger.find("j1199", "web-01", 1).is_some());
        assert!(ledger.unfinished().is_empty());
        drop(ledger);
        let ledger = Ledger::open(&state, 5000 + PRUNE_MARGIN_SECS).expect("reopen");
        assert!(ledger.is_empty());
        assert!(ledger.unfinished().is_empty());
    }

    #[test]
    fn a_torn_last_line_is_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("agent.json");
        {
            let mut ledger = Ledger::open(&state, 1000).expect("open");
            ledger.begin(entry("a", "r1", 2000)).expect("begin");
            ledger.done("r1", 1000).expect("done");
        }
        let path = Ledger::path_for(&state);
        let mut file = OpenOptions::new().append(true).open(&path).expect("open");
        file.write_all(br#"{"entry":"ran","job_id":"b","ho"#).expect("torn write");
        drop(file);
        let mut ledger = Ledger::open(&state, 1000).expect("reopen");
        assert!(ledger.find("a", "web-01", 1).is_some());
        assert!(ledger.find("b", "web-01", 1).is_none());
        assert!(ledger.unfinished().is_empty());
        // The torn tail is gone, so the next line is whole.
        ledger.begin(entry("c", "r3", 2000)).expect("begin");
        drop(ledger);
        let ledger = Ledger::open(&state, 1000).expect("reopen");
        assert!(ledger.find("c", "web-01", 1).is_some());
    }

    #[test]
    fn attempts_are_separate_runs_and_old_lines_read_as_attempt_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("agent.json");
        // A line as agents wrote it before attempts existed.
        std::fs::write(
            Ledger::path_for(&state),
            concat!(
                r#"{"entry":"kept","job_id":"old","host":"web-01","method":"sync.bash","expires_at":2000,"#,
                r#""ran_at":1000,"run_id":"r0","queue_job_id":3,"reply_tube":"polaris.results"}"#,
                "\n"
            ),
        )
        .expect("write old ledger");
        let mut ledger = Ledger::open(&state, 1000).expect("open");
        assert!(ledger.find("old", "web-01", 1).is_some());
        assert!(ledger.find("old", "web-01", 2).is_none());
        ledger.begin(Ran { attempt: 2, ..entry("old", "r1", 2000) }).expect("begin");
        ledger.done("r1", 1000).expect("done");
        drop(ledger);
        let ledger = Ledger::open(&state, 1000).expect("reopen");
        assert_eq!(ledger.find("old", "web-01", 1).map(|r| r.run_id.as_str()), Some("r0"));
        assert_eq!(ledger.find("old", "web-01", 2).map(|r| r.run_id.as_str()), Some("r1"));
        assert_eq!(ledger.len(), 2);
    }

    #[test]
    fn cancels_are_kept_across_restarts_until_they_lapse() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("agent.json");
        let cancel = |job_id: &str, attempt: Option<u32>| Cancelled {
            job_id: job_id.into(),
            host: "web-01".into(),
            attempt,
            issued_at: 1000,
            until: 3000,
        };
        {
            let mut ledger = Ledger::open(&state, 1000).expect("open");
            ledger.cancel(cancel("every", None)).expect("cancel");
            ledger.cancel(cancel("second", Some(2))).expect("cancel");
            let again = Cancelled { until: 3500, ..cancel("second", Some(2)) };
            ledger.cancel(again).expect("the same cancel again, heard later");
        }
        for _ in 0..2 {
            let ledger = Ledger::open(&state, 1500).expect("reopen");
            assert!(ledger.cancelled("every", "web-01", 1).is_some());
            assert!(ledger.cancelled("every", "web-01", 7).is_some());
            assert!(ledger.cancelled("every", "web-02", 1).is_none());
            assert!(ledger.cancelled("second", "web-01", 2).is_some());
            assert!(ledger.cancelled("second", "web-01", 1).is_none());
        }
        let lines = std::fs::read_to_string(Ledger::path_for(&state)).expect("read").lines().count();
        assert_eq!(lines, 2);
        let ledger = Ledger::open(&state, 3001).expect("reopen later");
        assert!(ledger.cancelled("every", "web-01", 1).is_none());
    }
}
