//! The dispatcher's database: `hosts`, `jobs` and `host_job`, and the fleet tables
//! (`fleet_nodes`, `fleet_placements`, `fleet_labels`, `fleet_audit`) that
//! [`crate::fleet`] reads and writes.
//!
//! Every job and its full host list are written here before anything is put on the queue
//! or answered, so a dispatcher restart loses nothing: unfinished host jobs are found here
//! again and results that waited in the reply tube are matched to them.
//!
//! The database is SQLite by default, or PostgreSQL (see [`crate::db`], which holds each
//! backend's migrations); every query here is written once for both.

use crate::db::{params, Connection, OptionalExtension};
use polaris_ops_wire::codes::Code;
use polaris_ops_wire::wire::{unix_now_ms, Encoding, HostResult, Method, Resp};
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

/// How many log lines the dispatcher keeps, per host and path, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogRetention {
    /// Most lines kept per host and path; older ones are dropped as new ones arrive.
    pub max_lines: u64,
    /// Lines older than this (milliseconds since they were received) are dropped.
    pub max_age_ms: i64,
}

impl Default for LogRetention {
    fn default() -> Self {
        LogRetention { max_lines: 10_000, max_age_ms: 7 * 86_400_000 }
    }
}

/// Most continuous-integrity reports kept per host and task (the oldest go first).
pub const MAX_INTEGRITY_REPORTS: i64 = 1000;
/// Largest stored integrity report, in bytes of JSON (agents cap theirs well below).
pub const MAX_INTEGRITY_REPORT_BYTES: usize = 1 << 20;
/// Longest log line stored, in bytes (agents cut theirs at their own, smaller, cap).
pub const MAX_LOG_LINE_BYTES: usize = 64 * 1024;

/// A stored continuous-integrity report.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StoredIntegrityReport {
    /// The dispatcher's number for it.
    pub id: i64,
    /// The task's name.
    pub task: String,
    /// The agent's number for it.
    pub seq: i64,
    /// When the agent scanned (Unix ms).
    pub at_ms: i64,
    /// When the dispatcher received it (Unix ms).
    pub received_at_ms: i64,
    /// AIDE's bits of what changed.
    pub retcode: i64,
    /// One line for people.
    pub message: String,
    /// The report JSON.
    pub report: serde_json::Value,
}

/// A stored log line.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StoredLogLine {
    /// Its number, growing in the order lines were received.
    pub seq: i64,
    /// When the dispatcher received it (Unix ms).
    pub at_ms: i64,
    /// The path, as the task names it.
    pub path: String,
    /// The line, without its newline.
    pub line: String,
}

/// Most live output kept per host attempt as `output` events, in bytes of output (the
/// result's own cap: beyond it the agent keeps no output either).
pub const MAX_LIVE_OUTPUT_BYTES: u64 = 64 * 1024;
/// Largest `data` of one chunk accepted, in bytes (base64 of 16 KiB, with room).
pub const MAX_CHUNK_DATA_BYTES: usize = 24 * 1024;

/// The columns [`job_row`] reads, in its order.
const JOB_COLUMNS: &str =
    "id, method, cmd, timeout_secs, created_at, start_by, cancelled_at, target, level, priority, \
     task_name, task_from, policy, not_before, current_batch, halted, args";

/// A database failure, with what the dispatcher was doing.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed.
    #[error("{context}: {source}")]
    Database {
        /// What the dispatcher was doing.
        context: &'static str,
        /// The database's error.
        source: crate::db::DbError,
    },
    /// The data directory could not be created.
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The database holds a value this version cannot read.
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

/// Names what the dispatcher was doing when the database failed.
pub(crate) trait Context<T> {
    /// The result, its error wrapped with `context`.
    fn ctx(self, context: &'static str) -> Result<T, StoreError>;
}

impl<T> Context<T> for crate::db::Result<T> {
    fn ctx(self, context: &'static str) -> Result<T, StoreError> {
        self.map_err(|source| StoreError::Database { context, source })
    }
}

/// Where one host's part of a job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostState {
    /// Stored, not yet on the queue (just created, or the queue was down).
    Pending,
    /// On the queue in `host.<id>`, waiting for the agent.
    Ready,
    /// Taken by the agent; its result has not arrived yet.
    Reserved,
    /// The agent answered: the command ran or the query was answered.
    Success,
    /// The job failed: unknown host, killed by timeout, refused by the agent, ...
    Failed,
    /// Revoked by `DELETE /v1/jobs/{id}` before the agent took it.
    Revoked,
    /// No answer before the deadline.
    Expired,
    /// Held back by the job's policy: its start time, its batch, the concurrency cap, or
    /// the delay before a retry.
    Waiting,
    /// Never started: the job's failure threshold was crossed first (`0x020A`).
    Skipped,
    /// Cancelled while it ran; the agent killed the command (`0x0104`).
    Cancelled,
}

impl HostState {
    /// The name used in the database and the REST API.
    pub fn as_str(self) -> &'static str {
        match self {
            HostState::Pending => "pending",
            HostState::Ready => "ready",
            HostState::Reserved => "reserved",
            HostState::Success => "success",
            HostState::Failed => "failed",
            HostState::Revoked => "revoked",
            HostState::Expired => "expired",
            HostState::Waiting => "waiting",
            HostState::Skipped => "skipped",
            HostState::Cancelled => "cancelled",
        }
    }

    /// Parses a state name as stored.
    pub(crate) fn parse(name: &str) -> Result<HostState, StoreError> {
        Ok(match name {
            "pending" => HostState::Pending,
            "ready" => HostState::Ready,
            "reserved" => HostState::Reserved,
            "success" => HostState::Success,
            "failed" => HostState::Failed,
            "revoked" => HostState::Revoked,
            "expired" => HostState::Expired,
            "waiting" => HostState::Waiting,
            "skipped" => HostState::Skipped,
            "cancelled" => HostState::Cancelled,
            other => return Err(StoreError::Corrupt(format!("unknown host_job state {other:?}"))),
        })
    }

    /// Whether the host has its final answer (a late agent result may still replace
    /// `expired`, since it is better information than "no answer").
    pub fn is_final(self) -> bool {
        matches!(
            self,
            HostState::Success
                | HostState::Failed
                | HostState::Revoked
                | HostState::Expired
                | HostState::Skipped
                | HostState::Cancelled
        )
    }
}

/// A registered host.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HostRecord {
    /// The host id (its tube is `host.<id>`).
    pub id: String,
    /// The hostname the agent reported.
    pub hostname: String,
    /// Unix milliseconds of the first registration.
    pub registered_at_ms: i64,
    /// Unix milliseconds of the latest registration.
    pub last_seen_ms: i64,
}

/// A dispatch job as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRecord {
    /// The job id (a UUID).
    pub id: String,
    /// What the hosts are asked to do.
    pub method: Method,
    /// The command (empty for `sync.query`).
    pub cmd: String,
    /// Seconds the command may run on each host.
    pub timeout_secs: u32,
    /// Unix milliseconds when the job was stored.
    pub created_at_ms: i64,
    /// Unix milliseconds after which no agent may start it.
    pub start_by_ms: i64,
    /// Unix milliseconds when it was cancelled (`DELETE /v1/jobs/{id}`), if it was.
    pub cancelled_at_ms: Option<i64>,
    /// The request's `target`, as JSON text, when it was given one rather than `hosts`.
    pub target: Option<String>,
    /// The level it was targeted at (`host`, `component`, …); `None` for jobs stored
    /// before levels existed (host lists).
    pub level: Option<String>,
    /// The queue priority of its envelopes; `None` for jobs stored before priorities were
    /// recorded (the method decides, as it did then).
    pub priority: Option<u32>,
    /// The standing task it was fired for, if the scheduler made it.
    pub task: Option<TaskOrigin>,
    /// How it runs (start time, retries, batches, limits); default for none.
    pub policy: crate::policy::Policy,
    /// Unix milliseconds before which no host starts.
    pub not_before_ms: Option<i64>,
    /// The batch running (from 0), for a batched job that started.
    pub current_batch: Option<u32>,
    /// Why no further host starts, once the failure threshold was crossed.
    pub halted: Option<String>,
    /// The method's arguments as JSON text (`log.tail`, `log.grep`); `None` otherwise.
    pub args: Option<String>,
}

/// The standing task a scheduled job was fired for.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TaskOrigin {
    /// The task's name.
    pub name: String,
    /// Where the definition that fired sits: a node path, or `host`.
    pub from: String,
}

/// One host's part of a job as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostJobRecord {
    /// The host id as requested.
    pub host: String,
    /// Where it stands.
    pub state: HostState,
    /// Where its envelope was put on `host.<id>`, once it was.
    pub queued: Option<QueueRef>,
    /// The answer, once final.
    pub outcome: Option<Outcome>,
    /// Unix milliseconds of the last change.
    pub updated_at_ms: i64,
    /// Its attempt, from 1.
    pub attempt: u32,
    /// Its batch, from 0, in a batched job.
    pub batch: Option<u32>,
    /// False while the rollout has yet to decide whether a final answer is retried.
    pub settled: bool,
}

/// One event of a job (see migration 10).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobEvent {
    /// Its place in the database's sequence: the SSE event id.
    pub seq: i64,
    /// Unix milliseconds.
    pub at_ms: i64,
    /// `host`, `batch`, `halted` or `cancelled`.
    pub kind: String,
    /// The host, for `host` events.
    pub host: Option<String>,
    /// The event's JSON.
    pub body: String,
}

/// One finished attempt of a host in a job that retries.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Attempt {
    /// From 1.
    pub attempt: u32,
    /// Unix milliseconds when its envelope was put on the queue (none if it never was).
    pub queued_at_ms: Option<i64>,
    /// When it ended.
    pub finished_at_ms: i64,
    /// How it ended.
    pub state: String,
    /// `success` or `failed`.
    pub resp: Option<String>,
    /// Exit status or code.
    pub retcode: Option<u32>,
    /// What happened.
    pub message: Option<String>,
}

/// Where a host job's envelope was put. A queue job id alone proves nothing: a queue
/// that restarts without its data hands the same ids to other jobs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueRef {
    /// The queue's job id.
    pub id: u64,
    /// The queue shard that holds it ([`crate::shard`]); `None` for rows stored before
    /// shards (the first shard).
    pub shard: Option<String>,
    /// The queue instance that issued `id` (see [`crate::QueueInfo::instance`]); `None`
    /// for rows stored before instances were recorded.
    pub instance: Option<String>,
    /// The hex signature of the envelope put under `id`; `None` for older rows.
    pub mac: Option<String>,
}

/// A final answer for one host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// `success` or `failed`.
    pub resp: Resp,
    /// Exit status on success, a 16-bit code on failure.
    pub retcode: u32,
    /// What happened, for people.
    pub message: String,
    /// Output or query facts: text, or base64 when `encoding` says so.
    pub data: String,
    /// `None` for text, else how `data` holds bytes that are not UTF-8.
    pub encoding: Option<Encoding>,
    /// Whether `data` was cut.
    pub truncated: bool,
}

impl Outcome {
    /// A failure with `code` and `message` and no data.
    pub fn failed(code: Code, message: impl Into<String>) -> Outcome {
        Outcome {
            resp: Resp::Failed,
            retcode: u32::from(code.value()),
            message: message.into(),
            data: String::new(),
            encoding: None,
            truncated: false,
        }
    }
}

/// A new job to store, validated by the API.
#[derive(Debug, Clone)]
pub struct NewJob {
    /// The job id.
    pub id: String,
    /// The method.
    pub method: Method,
    /// The command.
    pub cmd: String,
    /// Seconds each host may run it.
    pub timeout_secs: u32,
    /// Requested hosts, in request order, without duplicates.
    pub hosts: Vec<String>,
    /// The name of the token that created it, when tokens are on.
    pub token_name: Option<String>,
    /// The request's `target` as JSON text, when it had one.
    pub target: Option<String>,
    /// The level it was targeted at (`host` for a host list).
    pub level: String,
    /// The queue priority its envelopes are put with.
    pub priority: u32,
    /// The standing task it is fired for, if the scheduler makes it.
    pub task: Option<TaskOrigin>,
    /// How it runs.
    pub policy: crate::policy::Policy,
    /// The method's arguments as JSON text (`log.tail`, `log.grep`); `None` otherwise.
    pub args: Option<String>,
}

/// A host job that the enqueuer must put on the queue.
#[derive(Debug, Clone)]
pub struct PendingHostJob {
    /// The job.
    pub job: JobRecord,
    /// The host.
    pub host: String,
    /// Unix milliseconds after which no agent may start this host's attempt.
    pub start_by_ms: i64,
    /// The attempt, from 1.
    pub attempt: u32,
}

/// A host job past one of its deadlines.
#[derive(Debug, Clone)]
pub struct OverdueHostJob {
    /// The job id.
    pub job_id: String,
    /// The host.
    pub host: String,
    /// Its state when found.
    pub state: HostState,
    /// Where its envelope was put, if it was.
    pub queued: Option<QueueRef>,
    /// The job's timeout.
    pub timeout_secs: u32,
}

/// A `ready` host job and where its envelope was put.
#[derive(Debug, Clone)]
pub struct QueuedHostJob {
    /// The job id.
    pub job_id: String,
    /// The host.
    pub host: String,
    /// Where its envelope was put.
    pub queued: QueueRef,
    /// Unix milliseconds after which no agent may start it.
    pub start_by_ms: i64,
    /// Whether its job was cancelled.
    pub cancelled: bool,
}

/// A job in the `GET /v1/jobs` list.
#[derive(Debug, Clone)]
pub struct JobSummary {
    /// The job.
    pub job: JobRecord,
    /// How many hosts are in each state, by state name.
    pub state_counts: Vec<(String, u64)>,
}

/// What [`Store::record_result`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordOutcome {
    /// The result is now the host's answer.
    Recorded,
    /// The host already had a final answer; the result was a duplicate.
    AlreadyFinal,
    /// No such job/host pair (e.g. the database was replaced).
    Unknown,
    /// The agent refused a copy of an envelope it had already run (see
    /// [`Store::record_result`]); nothing was recorded.
    Replayed,
}

/// The dispatcher's database. One connection behind a mutex: the dispatcher writes a few
/// rows per job, so a pool would add complexity without speed.
pub struct Store {
    conn: Mutex<Connection>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

/// Where the dispatcher's database is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseLocation {
    /// SQLite, `dispatch.db` in this directory (`--data-dir`, the default).
    SqliteDir(std::path::PathBuf),
    /// A PostgreSQL server (`--database postgres://…`).
    Postgres(String),
}

impl std::fmt::Display for DatabaseLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DatabaseLocation::SqliteDir(dir) => write!(f, "{}", dir.join("dispatch.db").display()),
            // Without the password, should the URL carry one.
            DatabaseLocation::Postgres(url) => match url.split_once('@') {
                Some((_, rest)) => write!(f, "postgres://…@{rest}"),
                None => f.write_str(url),
            },
        }
    }
}

const HOST_JOB_COLUMNS: &str = "host, state, queue_job_id, resp, retcode, message, data, truncated, updated_at, \
     encoding, queue_instance, envelope_mac, attempt, batch, settled, queue_shard";

impl Store {
    /// Opens (creating if needed) `dir/dispatch.db` and brings its schema up to date.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|source| StoreError::DataDir { path: dir.display().to_string(), source })?;
        Ok(Store::new(crate::db::sqlite::open(&dir.join("dispatch.db")).ctx("open dispatch.db")?))
    }

    /// Opens the database at `location` and brings its schema up to date.
    pub fn open_at(location: &DatabaseLocation) -> Result<Store, StoreError> {
        match location {
            DatabaseLocation::SqliteDir(dir) => Store::open(dir),
            DatabaseLocation::Postgres(url) => {
                Ok(Store::new(crate::db::postgres::open(url).ctx("open the PostgreSQL database")?))
            }
        }
    }

    /// Opens an in-memory SQLite database (tests).
    pub fn open_in_memory() -> Result<Store, StoreError> {
        Ok(Store::new(crate::db::sqlite::open_in_memory().ctx("open in-memory database")?))
    }

    /// A fresh, empty database for a test: SQLite in memory, or a new PostgreSQL database
    /// on the server env `POLARIS_TEST_DATABASE` names (`postgres://user@host:port`).
    #[cfg(test)]
    pub(crate) fn open_for_test() -> Store {
        match test_database() {
            Some(url) => Store::open_at(&DatabaseLocation::Postgres(url)).expect("open the test database"),
            None => Store::open_in_memory().expect("open an in-memory database"),
        }
    }

    fn new(conn: Connection) -> Store {
        Store { conn: Mutex::new(conn) }
    }

    /// The connection, locked. The fleet module runs its transactions on it.
    pub(crate) fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite consistent (transactions roll back
        // on drop), so a poisoned lock is safe to keep using.
        self.conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Which database this is.
    pub fn backend(&self) -> crate::db::Backend {
        self.conn().backend()
    }

    /// Takes or renews lease `name` for `holder` (a dispatcher's instance id) for the next
    /// `ttl_ms`, and answers whether `holder` has it: it does if it held it already or the
    /// last holder let it expire. The work one dispatcher does alone on a database
    /// (enqueueing, expiring, rollouts, cancels, schedules) is done only by the holder of
    /// its lease, so dispatchers sharing a PostgreSQL database never do it twice, and one
    /// that dies hands it on when its lease runs out. The database's clock decides. An
    /// SQLite file has one dispatcher, which always holds every lease.
    pub fn hold_lease(&self, name: &str, holder: &str, ttl_ms: i64) -> Result<bool, StoreError> {
        let conn = self.conn();
        if conn.backend() == crate::db::Backend::Sqlite {
            return Ok(true);
        }
        let held = conn
            .execute(
                "INSERT INTO leases (name, holder, expires_at) VALUES (?1, ?2, polaris_now_ms() + ?3)
                 ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at
                 WHERE leases.holder = excluded.holder OR leases.expires_at < polaris_now_ms()",
                params![name, holder, ttl_ms],
            )
            .ctx("take or renew a lease")?;
        Ok(held == 1)
    }

    /// Gives lease `name` up if `holder` has it (a dispatcher that stops), so another
    /// dispatcher takes it at once rather than when it would have run out.
    pub fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        let conn = self.conn();
        if conn.backend() == crate::db::Backend::Postgres {
            conn.execute("DELETE FROM leases WHERE name = ?1 AND holder = ?2", params![name, holder])
                .ctx("release a lease")?;
        }
        Ok(())
    }

    /// Registers `id` or refreshes it; returns the record and whether it is new.
    pub fn upsert_host(&self, id: &str, hostname: &str) -> Result<(HostRecord, bool), StoreError> {
        self.upsert_host_with_facts(id, hostname, None)
    }

    /// Registers `id` or refreshes it, with the facts its agent reported (JSON text);
    /// `None` keeps the facts stored before. Where the host sits in the fleet tree and its
    /// labels are never touched. Returns the record and whether it is new.
    pub fn upsert_host_with_facts(
        &self,
        id: &str,
        hostname: &str,
        facts: Option<&str>,
    ) -> Result<(HostRecord, bool), StoreError> {
        let now = unix_now_ms();
        let conn = self.conn();
        let existed = conn
            .prepare_cached("SELECT 1 FROM hosts WHERE id = ?1")
            .and_then(|mut s| s.exists([id]))
            .ctx("look up host")?;
        let facts_at = facts.map(|_| now);
        conn.prepare_cached(
            "INSERT INTO hosts (id, hostname, registered_at, last_seen, facts, facts_at) VALUES (?1, ?2, ?3, ?3, ?4, ?5)
             ON CONFLICT (id) DO UPDATE SET hostname = excluded.hostname, last_seen = excluded.last_seen,
                 facts = COALESCE(excluded.facts, hosts.facts), facts_at = COALESCE(excluded.facts_at, hosts.facts_at)",
        )
        .and_then(|mut s| s.execute(params![id, hostname, now, facts, facts_at]))
        .ctx("register host")?;
        let host = get_host(&conn, id)?.ok_or_else(|| StoreError::Corrupt(format!("host {id} vanished")))?;
        Ok((host, !existed))
    }

    /// Records the digest of the effective task set the agent of `id` says it applied
    /// (sent with its heartbeats); false if the host is not registered.
    pub fn record_tasks_digest(&self, id: &str, digest: &str) -> Result<bool, StoreError> {
        let changed = self
            .conn()
            .prepare_cached(
                "UPDATE hosts SET tasks_digest = ?2,
                     tasks_digest_at = CASE WHEN tasks_digest IS NOT DISTINCT FROM ?2 THEN tasks_digest_at ELSE ?3 END
                 WHERE id = ?1",
            )
            .and_then(|mut s| s.execute(params![id, digest, unix_now_ms()]))
            .ctx("record tasks digest")?;
        Ok(changed == 1)
    }

    /// The host `id`, if registered.
    pub fn host(&self, id: &str) -> Result<Option<HostRecord>, StoreError> {
        get_host(&self.conn(), id)
    }

    /// All registered hosts, by id.
    pub fn hosts(&self) -> Result<Vec<HostRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached("SELECT id, hostname, registered_at, last_seen FROM hosts ORDER BY id")
            .ctx("list hosts")?;
        let rows = stmt.query_map((), host_from_row).ctx("list hosts")?;
        rows.collect::<crate::db::Result<Vec<_>>>().ctx("list hosts")
    }

    /// Unregisters `id`; false if it was not registered. Its past jobs keep their rows.
    pub fn delete_host(&self, id: &str) -> Result<bool, StoreError> {
        let n = self
            .conn()
            .prepare_cached("DELETE FROM hosts WHERE id = ?1")
            .and_then(|mut s| s.execute([id]))
            .ctx("delete host")?;
        Ok(n > 0)
    }

    /// Stores a job and one row per requested host, all in one transaction. Unknown hosts
    /// are stored as `failed` with [`Code::NoSuchHost`] at once; known ones as `pending`.
    /// Returns `Ok(false)` if the id was used before.
    pub fn create_job(&self, job: &NewJob, start_by_ms: i64) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().ctx("begin create job")?;
        if !insert_job(&tx, job, start_by_ms)? {
            return Ok(false);
        }
        tx.commit().ctx("commit create job")?;
        Ok(true)
    }

    /// The job `id` and its hosts in request order.
    pub fn job(&self, id: &str) -> Result<Option<(JobRecord, Vec<HostJobRecord>)>, StoreError> {
        let conn = self.conn();
        let job = conn
            .prepare_cached(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"))
            .and_then(|mut s| s.query_row([id], job_row).optional())
            .ctx("read job")?;
        let Some(job) = job else { return Ok(None) };
        let job = job?;
        let sql = format!("SELECT {HOST_JOB_COLUMNS} FROM host_job WHERE job_id = ?1 ORDER BY position");
        let mut stmt = conn.prepare_cached(&sql).ctx("read host jobs")?;
        let rows = stmt.query_map([id], host_job_row).ctx("read host jobs")?;
        let mut hosts = Vec::new();
        for row in rows {
            hosts.push(row.ctx("read host job")??);
        }
        Ok(Some((job, hosts)))
    }

    /// Host jobs by state, for `/metrics`: the open states (`pending`, `ready`, `reserved`)
    /// only, which the partial index `host_job_open` counts without reading the table; with
    /// `final_states`, every state, which reads the whole table.
    pub fn host_job_counts(&self, final_states: bool) -> Result<Vec<(String, u64)>, StoreError> {
        let sql = if final_states {
            "SELECT state, COUNT(*) FROM host_job GROUP BY state"
        } else {
            "SELECT state, COUNT(*) FROM host_job WHERE state IN ('pending', 'ready', 'reserved') GROUP BY state"
        };
        let conn = self.conn();
        let mut statement = conn.prepare_cached(sql).ctx("prepare host job counts")?;
        let rows = statement
            .query_map((), |row| Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?)))
            .ctx("count host jobs by state")?;
        let mut counts = Vec::new();
        for row in rows {
            let (state, n) = row.ctx("read a host job count")?;
            counts.push((state, u64::try_from(n).unwrap_or(0)));
        }
        Ok(counts)
    }

    /// When job `id` was stored (Unix milliseconds), and whether it has host jobs not yet
    /// put on the queue (`pending`); `None` for an unknown job.
    pub fn job_fanout_state(&self, id: &str) -> Result<Option<(i64, bool)>, StoreError> {
        self.conn()
            .prepare_cached(
                "SELECT created_at, EXISTS (SELECT 1 FROM host_job WHERE job_id = ?1 AND state = 'pending') \
                 FROM jobs WHERE id = ?1",
            )
            .and_then(|mut s| s.query_row([id], |row| Ok((row.get::<_, i64>(0)?, row.get::<_, bool>(1)?))).optional())
            .ctx("read a job's fan-out state")
    }

    /// When job `id` was stored (Unix milliseconds), if every host job of it is final;
    /// `None` while some are open (or for an unknown job).
    pub fn job_completed_since(&self, id: &str) -> Result<Option<i64>, StoreError> {
        self.conn()
            .prepare_cached(
                "SELECT created_at FROM jobs WHERE id = ?1 AND NOT EXISTS \
                 (SELECT 1 FROM host_job WHERE job_id = ?1 AND state IN ('pending', 'ready', 'reserved'))",
            )
            .and_then(|mut s| s.query_row([id], |row| row.get::<_, i64>(0)).optional())
            .ctx("read a job's completion")
    }

    /// Whether every host of job `id` has a final answer.
    pub fn job_is_final(&self, id: &str) -> Result<bool, StoreError> {
        let open: i64 = self
            .conn()
            .prepare_cached(
                "SELECT COUNT(*) FROM host_job
                 WHERE job_id = ?1 AND (state IN ('pending', 'ready', 'reserved', 'waiting') OR settled = 0)",
            )
            .and_then(|mut s| s.query_row([id], |row| row.get(0)))
            .ctx("count open host jobs")?;
        Ok(open == 0)
    }

    /// A page of jobs, newest first, and the total number of jobs.
    pub fn list_jobs(&self, limit: u32, offset: u64) -> Result<(Vec<JobSummary>, u64), StoreError> {
        let conn = self.conn();
        let total: i64 = conn
            .prepare_cached("SELECT COUNT(*) FROM jobs")
            .and_then(|mut s| s.query_row((), |row| row.get(0)))
            .ctx("count jobs")?;
        let mut jobs = Vec::new();
        {
            let mut stmt = conn
                .prepare_cached(&format!("SELECT {JOB_COLUMNS} FROM jobs ORDER BY seq DESC LIMIT ?1 OFFSET ?2"))
                .ctx("list jobs")?;
            let offset = i64::try_from(offset).unwrap_or(i64::MAX);
            let rows = stmt.query_map(params![limit, offset], job_row).ctx("list jobs")?;
            for row in rows {
                jobs.push(row.ctx("list jobs")??);
            }
        }
        let mut counts = conn
            .prepare_cached("SELECT state, COUNT(*) FROM host_job WHERE job_id = ?1 GROUP BY state ORDER BY state")
            .ctx("count host states")?;
        let mut summaries = Vec::with_capacity(jobs.len());
        for job in jobs {
            let state_counts = counts
                .query_map([&job.id], |row| Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)? as u64)))
                .and_then(|rows| rows.collect::<crate::db::Result<Vec<_>>>())
                .ctx("count host states")?;
            summaries.push(JobSummary { job, state_counts });
        }
        Ok((summaries, total as u64))
    }

    /// Up to `limit` pending host jobs of jobs not cancelled whose start deadline is still
    /// ahead, oldest first.
    pub fn pending(&self, now_ms: i64, limit: usize) -> Result<Vec<PendingHostJob>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT j.id, j.method, j.cmd, j.timeout_secs, j.created_at, j.start_by, j.cancelled_at,
                        j.target, j.level, j.priority, j.task_name, j.task_from, j.policy, j.not_before,
                        j.current_batch, j.halted, j.args, h.host, COALESCE(h.start_by, j.start_by), h.attempt
                 FROM host_job h JOIN jobs j ON j.id = h.job_id
                 WHERE h.state = 'pending' AND COALESCE(h.start_by, j.start_by) > ?1 AND j.cancelled_at IS NULL
                 ORDER BY j.seq, h.position
                 LIMIT ?2",
            )
            .ctx("list pending host jobs")?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = stmt
            .query_map(params![now_ms, limit], |row| {
                Ok((job_row(row)?, row.get::<_, String>(17)?, row.get::<_, i64>(18)?, row.get::<_, u32>(19)?))
            })
            .ctx("list pending host jobs")?;
        let mut out = Vec::new();
        for row in rows {
            let (job, host, start_by_ms, attempt) = row.ctx("list pending host jobs")?;
            out.push(PendingHostJob { job: job?, host, start_by_ms, attempt });
        }
        Ok(out)
    }

    /// Moves a host job from `from` to `to`, setting its queue job id if given. Returns
    /// false if it was no longer in `from` (someone else moved it first).
    pub fn transition(
        &self,
        job_id: &str,
        host: &str,
        from: HostState,
        to: HostState,
        queue_job_id: Option<u64>,
    ) -> Result<bool, StoreError> {
        let n = self
            .conn()
            .prepare_cached(
                "UPDATE host_job SET state = ?4, queue_job_id = COALESCE(?5, queue_job_id), updated_at = ?6
                 WHERE job_id = ?1 AND host = ?2 AND state = ?3",
            )
            .and_then(|mut s| {
                s.execute(params![
                    job_id,
                    host,
                    from.as_str(),
                    to.as_str(),
                    queue_job_id.map(|id| id as i64),
                    unix_now_ms()
                ])
            })
            .ctx("update host job state")?;
        Ok(n > 0)
    }

    /// Records that a `pending` host job's envelope is on the queue: `ready`, with where it
    /// is. Returns false if the host job was no longer pending (revoked meanwhile).
    pub fn mark_queued(&self, job_id: &str, host: &str, queued: &QueueRef) -> Result<bool, StoreError> {
        mark_queued(&self.conn(), job_id, host, queued)
    }

    /// [`Store::mark_queued`] for many host jobs, in one transaction (one sync to disk).
    pub fn mark_queued_batch(&self, queued: &[(String, String, QueueRef)]) -> Result<Vec<bool>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().ctx("begin mark queued")?;
        let marked = queued
            .iter()
            .map(|(job_id, host, queued)| mark_queued(&tx, job_id, host, queued))
            .collect::<Result<Vec<bool>, StoreError>>()?;
        tx.commit().ctx("commit mark queued")?;
        Ok(marked)
    }

    /// Gives a `ready` host job its final answer if it is still `ready` under queue job
    /// `queue_id` (and not, say, queued again under another id meanwhile).
    pub fn finish_queued(
        &self,
        job_id: &str,
        host: &str,
        queue_id: u64,
        to: HostState,
        outcome: &Outcome,
    ) -> Result<bool, StoreError> {
        apply_queued(&self.conn(), job_id, host, queue_id, &QueuedChange::Finish(to, outcome.clone()))
    }

    /// Moves a `ready` host job under queue job `queue_id` to `reserved` (an agent has it).
    pub fn reserve_queued(&self, job_id: &str, host: &str, queue_id: u64) -> Result<bool, StoreError> {
        apply_queued(&self.conn(), job_id, host, queue_id, &QueuedChange::Reserve)
    }

    /// Applies changes to `ready` host jobs of job `job_id`, each only if the host job is
    /// still `ready` under the given queue job id, in one transaction. Returns which applied.
    pub fn apply_queued_batch(
        &self,
        job_id: &str,
        changes: &[(String, u64, QueuedChange)],
    ) -> Result<Vec<bool>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().ctx("begin queued changes")?;
        let applied = changes
            .iter()
            .map(|(host, queue_id, change)| apply_queued(&tx, job_id, host, *queue_id, change))
            .collect::<Result<Vec<bool>, StoreError>>()?;
        tx.commit().ctx("commit queued changes")?;
        Ok(applied)
    }

    /// Cancels job `id` in one transaction: marks it cancelled, so the enqueuer puts none of
    /// its envelopes any more and no batch or retry starts, and gives every `pending` or
    /// `waiting` host job `revoked`. Host jobs already
    /// on the queue are left to the caller. Returns false if there is no such job.
    pub fn cancel_job(&self, id: &str, revoked: &Outcome) -> Result<bool, StoreError> {
        let now = unix_now_ms();
        let mut conn = self.conn();
        let tx = conn.transaction().ctx("begin cancel job")?;
        let found = tx
            .prepare_cached("UPDATE jobs SET cancelled_at = COALESCE(cancelled_at, ?2) WHERE id = ?1")
            .and_then(|mut s| s.execute(params![id, now]))
            .ctx("cancel job")?;
        if found == 0 {
            return Ok(false);
        }
        tx.prepare_cached(
            "UPDATE host_job SET state = 'revoked', resp = ?2, retcode = ?3, message = ?4, data = ?5,
                    truncated = ?6, encoding = NULL, updated_at = ?7, finished_at = ?7
             WHERE job_id = ?1 AND state IN ('pending', 'waiting')",
        )
        .and_then(|mut s| {
            s.execute(params![
                id,
                revoked.resp.as_str(),
                revoked.retcode,
                revoked.message,
                revoked.data,
                revoked.truncated,
                now
            ])
        })
        .ctx("revoke pending host jobs")?;
        tx.commit().ctx("commit cancel job")?;
        Ok(true)
    }

    /// Cancels one host of job `id`: marks it cancelled (no retry, no later batch starts
    /// it), and revokes it if it has not been queued yet. Answers its state afterwards, or
    /// `None` if the job has no such host.
    pub fn cancel_host(&self, id: &str, host: &str, revoked: &Outcome) -> Result<Option<HostState>, StoreError> {
        let now = unix_now_ms();
        let mut conn = self.conn();
        let tx = conn.transaction().ctx("begin cancel host")?;
        let found = tx
            .prepare_cached(
                "UPDATE host_job SET cancelled_at = COALESCE(cancelled_at, ?3) WHERE job_id = ?1 AND host = ?2",
            )
            .and_then(|mut s| s.execute(params![id, host, now]))
            .ctx("cancel host job")?;
        if found == 0 {
            return Ok(None);
        }
        tx.prepare_cached(
            "UPDATE host_job SET state = 'revoked', resp = ?3, retcode = ?4, message = ?5, data = '',
                    truncated = 0, encoding = NULL, updated_at = ?6, finished_at = ?6
             WHERE job_id = ?1 AND host = ?2 AND state IN ('pending', 'waiting')",
        )
        .and_then(|mut s| s.execute(params![id, host, revoked.resp.as_str(), revoked.retcode, revoked.message, now]))
        .ctx("revoke host job")?;
        let state: String = tx
            .prepare_cached("SELECT state FROM host_job WHERE job_id = ?1 AND host = ?2")
            .and_then(|mut s| s.query_row(params![id, host], |r| r.get(0)))
            .ctx("read host job state")?;
        tx.commit().ctx("commit cancel host")?;
        Ok(Some(HostState::parse(&state)?))
    }

    /// Hosts an agent is running for a job (or a host) that was cancelled, whose agent has
    /// not been told yet: `(job id, host, attempt)`.
    pub fn cancels_to_send(&self) -> Result<Vec<(String, String, u32)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT h.job_id, h.host, h.attempt FROM host_job h JOIN jobs j ON j.id = h.job_id
                 WHERE h.state = 'reserved' AND h.cancel_sent_at IS NULL
                   AND (j.cancelled_at IS NOT NULL OR h.cancelled_at IS NOT NULL)
                 ORDER BY j.seq, h.position LIMIT 500",
            )
            .ctx("list cancels to send")?;
        let rows = stmt.query_map((), |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).ctx("list cancels to send")?;
        rows.collect::<crate::db::Result<_>>().ctx("list cancels to send")
    }

    /// Records that the agent of `host` was told to cancel `attempt` of job `job_id`.
    pub fn mark_cancel_sent(&self, job_id: &str, host: &str, attempt: u32) -> Result<(), StoreError> {
        self.conn()
            .prepare_cached("UPDATE host_job SET cancel_sent_at = ?4 WHERE job_id = ?1 AND host = ?2 AND attempt = ?3")
            .and_then(|mut s| s.execute(params![job_id, host, attempt, unix_now_ms()]))
            .ctx("record a cancel sent")?;
        Ok(())
    }

    /// Every finished attempt of job `id`'s hosts that the rollout archived, by host,
    /// oldest first.
    pub fn attempts_of_job(&self, id: &str) -> Result<std::collections::BTreeMap<String, Vec<Attempt>>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT host, attempt, queued_at, finished_at, state, resp, retcode, message FROM host_attempts
                 WHERE job_id = ?1 ORDER BY host, attempt",
            )
            .ctx("list attempts")?;
        let rows = stmt
            .query_map([id], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    Attempt {
                        attempt: r.get(1)?,
                        queued_at_ms: r.get(2)?,
                        finished_at_ms: r.get(3)?,
                        state: r.get(4)?,
                        resp: r.get(5)?,
                        retcode: r.get(6)?,
                        message: r.get(7)?,
                    },
                ))
            })
            .ctx("list attempts")?;
        let mut out: std::collections::BTreeMap<String, Vec<Attempt>> = std::collections::BTreeMap::new();
        for row in rows {
            let (host, attempt) = row.ctx("list attempts")?;
            out.entry(host).or_default().push(attempt);
        }
        Ok(out)
    }

    /// Records a chunk of a running command's output as an `output` event of its job, if
    /// the host still runs that attempt and the chunks kept stay within
    /// [`MAX_LIVE_OUTPUT_BYTES`] per attempt; answers whether it was kept.
    pub fn record_output(&self, chunk: &polaris_ops_wire::wire::OutputChunk) -> Result<bool, StoreError> {
        if chunk.offset >= MAX_LIVE_OUTPUT_BYTES || chunk.data.len() > MAX_CHUNK_DATA_BYTES {
            return Ok(false);
        }
        let body = serde_json::json!({
            "host": chunk.host,
            "attempt": chunk.attempt.unwrap_or(1),
            "offset": chunk.offset,
            "data": chunk.data,
            "encoding": chunk.encoding.map(Encoding::as_str),
        })
        .to_string();
        let n = self
            .conn()
            .prepare_cached(
                "INSERT INTO job_events (job_id, at, kind, host, body)
                 SELECT ?1, ?2, 'output', ?3, ?4 FROM host_job
                 WHERE job_id = ?1 AND host = ?3 AND attempt = ?5 AND state IN ('ready', 'reserved')",
            )
            .and_then(|mut s| {
                s.execute(params![chunk.job_id, unix_now_ms(), chunk.host, body, chunk.attempt.unwrap_or(1)])
            })
            .ctx("record output chunk")?;
        Ok(n > 0)
    }

    /// Records a continuous-integrity report (a copy of one already held adds nothing)
    /// and drops the task's oldest beyond [`MAX_INTEGRITY_REPORTS`]; false if it was a copy.
    pub fn record_integrity_report(&self, r: &polaris_ops_wire::wire::IntegrityReport) -> Result<bool, StoreError> {
        let report = r.report.to_string();
        if report.len() > MAX_INTEGRITY_REPORT_BYTES {
            return Ok(false);
        }
        let mut conn = self.conn();
        let tx = conn.transaction().ctx("record integrity report")?;
        let n = tx
            .execute(
                "INSERT INTO integrity_reports (host, task, seq, at, received_at, retcode, message, report)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT DO NOTHING",
                params![
                    r.host,
                    r.task,
                    i64::try_from(r.seq).unwrap_or(i64::MAX),
                    i64::try_from(r.at_ms).unwrap_or(i64::MAX),
                    unix_now_ms(),
                    r.retcode,
                    r.message,
                    report
                ],
            )
            .ctx("record integrity report")?;
        tx.execute(
            "DELETE FROM integrity_reports WHERE host = ?1 AND task = ?2 AND id <= (
                 SELECT id FROM integrity_reports WHERE host = ?1 AND task = ?2 ORDER BY id DESC LIMIT 1 OFFSET ?3)",
            params![r.host, r.task, MAX_INTEGRITY_REPORTS],
        )
        .ctx("trim integrity reports")?;
        tx.commit().ctx("record integrity report")?;
        Ok(n > 0)
    }

    /// The continuous-integrity reports of `host` (of `task` only, when given), newest
    /// first, and how many there are in all.
    pub fn integrity_reports(
        &self,
        host: &str,
        task: Option<&str>,
        limit: u32,
        offset: u64,
    ) -> Result<(Vec<StoredIntegrityReport>, u64), StoreError> {
        let conn = self.conn();
        let offset = i64::try_from(offset).unwrap_or(i64::MAX);
        let total: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM integrity_reports WHERE host = ?1 AND (?2 IS NULL OR task = ?2)",
                params![host, task],
                |r| r.get(0),
            )
            .ctx("count integrity reports")?;
        let mut stmt = conn
            .prepare_cached(
                "SELECT id, task, seq, at, received_at, retcode, message, report FROM integrity_reports
                 WHERE host = ?1 AND (?2 IS NULL OR task = ?2) ORDER BY id DESC LIMIT ?3 OFFSET ?4",
            )
            .ctx("list integrity reports")?;
        let rows = stmt
            .query_map(params![host, task, limit, offset], |r| {
                let report: String = r.get(7)?;
                Ok(StoredIntegrityReport {
                    id: r.get(0)?,
                    task: r.get(1)?,
                    seq: r.get(2)?,
                    at_ms: r.get(3)?,
                    received_at_ms: r.get(4)?,
                    retcode: r.get(5)?,
                    message: r.get(6)?,
                    report: serde_json::from_str(&report).unwrap_or(serde_json::Value::String(report)),
                })
            })
            .ctx("list integrity reports")?;
        let reports = rows.collect::<crate::db::Result<_>>().ctx("list integrity reports")?;
        Ok((reports, u64::try_from(total).unwrap_or(0)))
    }

    /// Records a batch of log lines, each once (a line already held, by its file and
    /// offset, is skipped), then applies `retention` to the batch's host and path.
    /// Answers how many lines were new.
    pub fn record_log_batch(
        &self,
        batch: &polaris_ops_wire::wire::LogBatch,
        retention: LogRetention,
    ) -> Result<usize, StoreError> {
        let now = unix_now_ms();
        let mut conn = self.conn();
        if let Some(refused) = &batch.refused {
            conn.execute(
                "INSERT INTO log_refusals (host, path, task, code, message, at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (host, path) DO UPDATE SET task = excluded.task, code = excluded.code,
                     message = excluded.message, at = excluded.at",
                params![batch.host, batch.path, batch.task, refused.code, refused.message, now],
            )
            .ctx("record log refusal")?;
            return Ok(0);
        }
        let tx = conn.transaction().ctx("record log lines")?;
        // A path read now is no longer refused.
        tx.execute("DELETE FROM log_refusals WHERE host = ?1 AND path = ?2", params![batch.host, batch.path])
            .ctx("record log lines")?;
        let mut added = 0;
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO log_lines (host, path, file, \"offset\", at, line)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT DO NOTHING",
                )
                .ctx("record log lines")?;
            if batch.lengths.len() != batch.lines.len() {
                return Err(StoreError::Corrupt(format!(
                    "log batch from {}: {} lines but {} lengths",
                    batch.host,
                    batch.lines.len(),
                    batch.lengths.len()
                )));
            }
            let mut offset = batch.offset;
            for (line, length) in batch.lines.iter().zip(&batch.lengths) {
                let mut kept = line.as_str();
                if kept.len() > MAX_LOG_LINE_BYTES {
                    let mut end = MAX_LOG_LINE_BYTES;
                    while !kept.is_char_boundary(end) {
                        end -= 1;
                    }
                    kept = &kept[..end];
                }
                added += insert
                    .execute(params![
                        batch.host,
                        batch.path,
                        batch.file,
                        i64::try_from(offset).unwrap_or(i64::MAX),
                        now,
                        kept
                    ])
                    .ctx("record log lines")?;
                offset = offset.saturating_add(*length);
            }
        }
        tx.execute(
            "DELETE FROM log_lines WHERE host = ?1 AND path = ?2 AND (at < ?3 OR seq <= (
                 SELECT seq FROM log_lines WHERE host = ?1 AND path = ?2 ORDER BY seq DESC LIMIT 1 OFFSET ?4))",
            params![
                batch.host,
                batch.path,
                now.saturating_sub(retention.max_age_ms),
                i64::try_from(retention.max_lines).unwrap_or(i64::MAX)
            ],
        )
        .ctx("trim log lines")?;
        tx.commit().ctx("record log lines")?;
        Ok(added)
    }

    /// Why `host`'s agent refuses to follow `path`, if it does: code, message, when (ms).
    pub fn log_refusal(&self, host: &str, path: &str) -> Result<Option<(String, String, i64)>, StoreError> {
        self.conn()
            .query_row(
                "SELECT code, message, at FROM log_refusals WHERE host = ?1 AND path = ?2",
                params![host, path],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .ctx("read log refusal")
    }

    /// Up to `limit` log lines of `host` and `path` after line `after`, oldest first.
    pub fn log_lines(&self, host: &str, path: &str, after: i64, limit: u32) -> Result<Vec<StoredLogLine>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT seq, at, path, line FROM log_lines WHERE host = ?1 AND path = ?2 AND seq > ?3
                 ORDER BY seq LIMIT ?4",
            )
            .ctx("list log lines")?;
        let rows = stmt
            .query_map(params![host, path, after, limit], |r| {
                Ok(StoredLogLine { seq: r.get(0)?, at_ms: r.get(1)?, path: r.get(2)?, line: r.get(3)? })
            })
            .ctx("list log lines")?;
        rows.collect::<crate::db::Result<_>>().ctx("list log lines")
    }

    /// Up to `limit` events of job `id` after event `after`, oldest first.
    pub fn events_after(&self, id: &str, after: i64, limit: u32) -> Result<Vec<JobEvent>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT seq, at, kind, host, body FROM job_events WHERE job_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
            )
            .ctx("list job events")?;
        let rows = stmt
            .query_map(params![id, after, limit], |r| {
                Ok(JobEvent { seq: r.get(0)?, at_ms: r.get(1)?, kind: r.get(2)?, host: r.get(3)?, body: r.get(4)? })
            })
            .ctx("list job events")?;
        rows.collect::<crate::db::Result<_>>().ctx("list job events")
    }

    /// Whether job `id` was cancelled.
    pub fn job_cancelled(&self, id: &str) -> Result<bool, StoreError> {
        let cancelled: Option<Option<i64>> = self
            .conn()
            .prepare_cached("SELECT cancelled_at FROM jobs WHERE id = ?1")
            .and_then(|mut s| s.query_row([id], |row| row.get(0)).optional())
            .ctx("read job cancellation")?;
        Ok(matches!(cancelled, Some(Some(_))))
    }

    /// The `ready` host jobs of job `id` and where their envelopes are.
    pub fn ready_of_job(&self, id: &str) -> Result<Vec<(String, QueueRef)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT host, queue_job_id, queue_shard, queue_instance, envelope_mac FROM host_job
                 WHERE job_id = ?1 AND state = 'ready' AND queue_job_id IS NOT NULL ORDER BY position",
            )
            .ctx("list ready host jobs")?;
        let rows = stmt
            .query_map([id], |row| {
                Ok((row.get::<_, String>(0)?, queue_ref(row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?)))
            })
            .ctx("list ready host jobs")?;
        let mut out = Vec::new();
        for row in rows {
            if let (host, Some(queued)) = row.ctx("list ready host jobs")? {
                out.push((host, queued));
            }
        }
        Ok(out)
    }

    /// A host job revoked while its envelope was being put, whose envelope an agent took
    /// before it could be deleted: `reserved` under that envelope, so its result counts.
    pub fn revoked_but_taken(&self, job_id: &str, host: &str, queued: &QueueRef) -> Result<bool, StoreError> {
        let n = self
            .conn()
            .prepare_cached(
                "UPDATE host_job SET state = 'reserved', resp = NULL, retcode = NULL, message = NULL, data = NULL,
                        finished_at = NULL, queue_job_id = ?3, queue_instance = ?4, envelope_mac = ?5, updated_at = ?6,
                        queue_shard = ?7
                 WHERE job_id = ?1 AND host = ?2 AND state = 'revoked'",
            )
            .and_then(|mut s| {
                s.execute(params![
                    job_id,
                    host,
                    queued.id as i64,
                    queued.instance,
                    queued.mac,
                    unix_now_ms(),
                    queued.shard
                ])
            })
            .ctx("reopen revoked host job")?;
        Ok(n > 0)
    }

    /// `ready` host jobs on queue shard `shard` (`first`: the first shard, which also has
    /// the rows stored before shards) whose queue job id was issued by another queue
    /// instance than `instance` (or by one not recorded), with their jobs' start deadlines;
    /// with `instance` `None`, every `ready` host job of the shard.
    pub fn ready_elsewhere(
        &self,
        shard: &str,
        first: bool,
        instance: Option<&str>,
    ) -> Result<Vec<QueuedHostJob>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT h.job_id, h.host, h.queue_job_id, h.queue_shard, h.queue_instance, h.envelope_mac,
                        COALESCE(h.start_by, j.start_by), j.cancelled_at IS NOT NULL OR h.cancelled_at IS NOT NULL
                 FROM host_job h JOIN jobs j ON j.id = h.job_id
                 WHERE h.state = 'ready' AND h.queue_job_id IS NOT NULL
                   AND (h.queue_shard = ?1 OR (h.queue_shard IS NULL AND ?2 = 1))
                   AND (CAST(?3 AS TEXT) IS NULL OR h.queue_instance IS NULL OR h.queue_instance != ?3)
                 ORDER BY j.seq, h.position",
            )
            .ctx("list ready host jobs of other queue instances")?;
        let rows = stmt
            .query_map(params![shard, first, instance], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, String>(1)?,
                    queue_ref(row.get(2)?, row.get(3)?, row.get(4)?, row.get(5)?),
                    row.get::<_, i64>(6)?,
                    row.get::<_, bool>(7)?,
                ))
            })
            .ctx("list ready host jobs of other queue instances")?;
        let mut out = Vec::new();
        for row in rows {
            let (job_id, host, queued, start_by_ms, cancelled) =
                row.ctx("list ready host jobs of other queue instances")?;
            if let Some(queued) = queued {
                out.push(QueuedHostJob { job_id, host, queued, start_by_ms, cancelled });
            }
        }
        Ok(out)
    }

    /// The queue shards `ready` host jobs name (not the rows from before shards).
    pub fn ready_shards(&self) -> Result<Vec<String>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT DISTINCT queue_shard FROM host_job WHERE state = 'ready' AND queue_shard IS NOT NULL",
            )
            .ctx("list the shards of ready host jobs")?;
        let rows = stmt.query_map((), |row| row.get::<_, String>(0)).ctx("list the shards of ready host jobs")?;
        rows.map(|row| row.ctx("list the shards of ready host jobs")).collect()
    }

    /// Records that the `ready` host job under `queue_id` is held by queue `instance`
    /// (found there after the queue restarted with its data).
    pub fn adopt(&self, job_id: &str, host: &str, queue_id: u64, instance: &str) -> Result<bool, StoreError> {
        let n = self
            .conn()
            .prepare_cached(
                "UPDATE host_job SET queue_instance = ?4, updated_at = ?5
                 WHERE job_id = ?1 AND host = ?2 AND state = 'ready' AND queue_job_id = ?3",
            )
            .and_then(|mut s| s.execute(params![job_id, host, queue_id as i64, instance, unix_now_ms()]))
            .ctx("record the queue instance of a host job")?;
        Ok(n > 0)
    }

    /// Makes a `ready` host job under `queue_id` `pending` again, forgetting where it was
    /// (the queue lost it), so the enqueuer puts it again.
    pub fn requeue(&self, job_id: &str, host: &str, queue_id: u64) -> Result<bool, StoreError> {
        let n = self
            .conn()
            .prepare_cached(
                "UPDATE host_job SET state = 'pending', queue_job_id = NULL, queue_instance = NULL,
                        envelope_mac = NULL, queue_shard = NULL, updated_at = ?4
                 WHERE job_id = ?1 AND host = ?2 AND state = 'ready' AND queue_job_id = ?3",
            )
            .and_then(|mut s| s.execute(params![job_id, host, queue_id as i64, unix_now_ms()]))
            .ctx("requeue host job")?;
        Ok(n > 0)
    }

    /// Gives a host job its final answer if it is still in `from`. Returns false if not.
    pub fn finish(
        &self,
        job_id: &str,
        host: &str,
        from: HostState,
        to: HostState,
        outcome: &Outcome,
    ) -> Result<bool, StoreError> {
        let n = self
            .conn()
            .prepare_cached(
                "UPDATE host_job SET state = ?4, resp = ?5, retcode = ?6, message = ?7, data = ?8,
                        truncated = ?9, updated_at = ?10, finished_at = ?10, encoding = ?11
                 WHERE job_id = ?1 AND host = ?2 AND state = ?3",
            )
            .and_then(|mut s| {
                s.execute(params![
                    job_id,
                    host,
                    from.as_str(),
                    to.as_str(),
                    outcome.resp.as_str(),
                    outcome.retcode,
                    outcome.message,
                    outcome.data,
                    outcome.truncated,
                    unix_now_ms(),
                    outcome.encoding.map(Encoding::as_str)
                ])
            })
            .ctx("finish host job")?;
        Ok(n > 0)
    }

    /// Records an agent's result. A result replaces any state but `success`, `failed` and
    /// `revoked`: a late answer is better information than `expired`.
    ///
    /// A refusal of a copy of an envelope the host already ran (`0x0408`) is not an answer:
    /// that host's own result for it is, or was, reported separately. Such copies exist when
    /// work moves between queue shards ([`crate::shard`]) while an agent is running it, and
    /// with several dispatchers the refusal may be read before the result.
    pub fn record_result(&self, result: &HostResult) -> Result<RecordOutcome, StoreError> {
        record_result(&self.conn(), result)
    }

    /// [`Store::record_result`] for each of `results`, in one transaction: one commit (and
    /// one sync to disk) for a whole batch the results consumer read off the queue.
    pub fn record_results(&self, results: &[&HostResult]) -> Result<Vec<RecordOutcome>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().ctx("begin record results")?;
        let outcomes = results.iter().map(|result| record_result(&tx, result)).collect::<Result<Vec<_>, _>>()?;
        tx.commit().ctx("commit record results")?;
        Ok(outcomes)
    }

    /// Host jobs past a deadline: `pending`/`ready` ones whose start deadline has passed,
    /// and `reserved` ones whose start deadline plus timeout plus `result_grace_ms` has.
    pub fn overdue(&self, now_ms: i64, result_grace_ms: i64) -> Result<Vec<OverdueHostJob>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT h.job_id, h.host, h.state, h.queue_job_id, j.timeout_secs, h.queue_instance, h.envelope_mac,
                        h.queue_shard
                 FROM host_job h JOIN jobs j ON j.id = h.job_id
                 WHERE (h.state IN ('pending', 'ready') AND COALESCE(h.start_by, j.start_by) <= ?1)
                    OR (h.state = 'reserved' AND COALESCE(h.start_by, j.start_by) + j.timeout_secs * 1000 + ?2 <= ?1)
                 ORDER BY j.seq, h.position",
            )
            .ctx("list overdue host jobs")?;
        let rows = stmt
            .query_map(params![now_ms, result_grace_ms], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, String>(2)?,
                    queue_ref(row.get(3)?, row.get(7)?, row.get(5)?, row.get(6)?),
                    row.get::<_, u32>(4)?,
                ))
            })
            .ctx("list overdue host jobs")?;
        let mut out = Vec::new();
        for row in rows {
            let (job_id, host, state, queued, timeout_secs) = row.ctx("list overdue host jobs")?;
            out.push(OverdueHostJob { job_id, host, state: HostState::parse(&state)?, queued, timeout_secs });
        }
        Ok(out)
    }
}

/// A change to a `ready` host job, applied only while it is still under the same queue
/// job id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueuedChange {
    /// Its final answer.
    Finish(HostState, Outcome),
    /// An agent has it.
    Reserve,
}

/// Stores a job and one row per requested host inside the caller's transaction (see
/// [`Store::create_job`]), so a job targeted at the fleet tree holds exactly the hosts the
/// tree gave in that same transaction. Returns `Ok(false)` if the id was used before.
pub(crate) fn insert_job(tx: &Connection, job: &NewJob, start_by_ms: i64) -> Result<bool, StoreError> {
    let now = unix_now_ms();
    let policy_text = if job.policy.is_default() {
        None
    } else {
        Some(serde_json::to_string(&job.policy).map_err(|e| StoreError::Corrupt(format!("job policy: {e}")))?)
    };
    // Hosts held back by the policy wait for the rollout to release them; a job that
    // retries keeps each final answer open until the rollout has looked at it.
    let first_state = if job.policy.gates_start() { HostState::Waiting } else { HostState::Pending };
    let settled = job.policy.retry.is_none();
    let batch_size = job.policy.batch.as_ref().map(|b| b.size_for(job.hosts.len()));
    let inserted = tx
        .prepare_cached(
            "INSERT INTO jobs (id, method, cmd, timeout_secs, created_at, start_by, token_name, target, level, priority,
                               task_name, task_from, policy, not_before, args)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15) ON CONFLICT (id) DO NOTHING",
        )
        .and_then(|mut s| {
            s.execute(params![
                job.id,
                job.method.as_str(),
                job.cmd,
                job.timeout_secs,
                now,
                start_by_ms,
                job.token_name,
                job.target,
                job.level,
                job.priority,
                job.task.as_ref().map(|t| &t.name),
                job.task.as_ref().map(|t| &t.from),
                policy_text,
                job.policy.start_at_ms,
                job.args
            ])
        })
        .ctx("insert job")?;
    if inserted == 0 {
        return Ok(false);
    }
    let mut known = tx.prepare_cached("SELECT 1 FROM hosts WHERE id = ?1").ctx("look up host")?;
    let mut insert = tx
        .prepare_cached(
            "INSERT INTO host_job (job_id, position, host, state, resp, retcode, message, data, updated_at, finished_at,
                                   batch, settled)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
        )
        .ctx("prepare host_job insert")?;
    for (position, host) in job.hosts.iter().enumerate() {
        let batch = batch_size.map(|size| (position / size) as i64);
        if known.exists([host]).ctx("look up host")? {
            insert
                .execute(params![
                    job.id,
                    position as i64,
                    host,
                    first_state.as_str(),
                    None::<String>,
                    None::<i64>,
                    None::<String>,
                    None::<String>,
                    now,
                    None::<i64>,
                    batch,
                    settled
                ])
                .ctx("insert host_job")?;
        } else {
            let failed = Outcome::failed(Code::NoSuchHost, "No such host");
            insert
                .execute(params![
                    job.id,
                    position as i64,
                    host,
                    HostState::Failed.as_str(),
                    failed.resp.as_str(),
                    failed.retcode,
                    failed.message,
                    failed.data,
                    now,
                    now,
                    batch,
                    true
                ])
                .ctx("insert host_job")?;
        }
    }
    Ok(true)
}

/// See [`Store::record_result`].
fn record_result(conn: &Connection, result: &HostResult) -> Result<RecordOutcome, StoreError> {
    if result.resp == Resp::Failed && result.retcode == u32::from(Code::EnvelopeReplayed.value()) {
        return Ok(RecordOutcome::Replayed);
    }
    let state = match result.resp {
        Resp::Success => HostState::Success,
        Resp::Failed if result.retcode == u32::from(Code::Cancelled.value()) => HostState::Cancelled,
        Resp::Failed => HostState::Failed,
    };
    // Only the attempt the host is at: a late answer to an attempt that was retried must
    // not be taken for the retry's (it is in that attempt's history already).
    let n = conn
        .prepare_cached(
            "UPDATE host_job SET state = ?3, resp = ?4, retcode = ?5, message = ?6, data = ?7,
                    truncated = ?8, output_bytes = ?9, updated_at = ?10, finished_at = ?10, encoding = ?11
             WHERE job_id = ?1 AND host = ?2 AND attempt = ?12
               AND state NOT IN ('success', 'failed', 'revoked', 'skipped', 'cancelled', 'waiting')",
        )
        .and_then(|mut s| {
            s.execute(params![
                result.job_id,
                result.host,
                state.as_str(),
                result.resp.as_str(),
                result.retcode,
                result.message,
                result.data,
                result.truncated,
                i64::try_from(result.output_bytes).unwrap_or(i64::MAX),
                unix_now_ms(),
                result.encoding.map(Encoding::as_str),
                result.attempt.unwrap_or(1)
            ])
        })
        .ctx("record result")?;
    if n > 0 {
        return Ok(RecordOutcome::Recorded);
    }
    let exists = conn
        .prepare_cached("SELECT 1 FROM host_job WHERE job_id = ?1 AND host = ?2")
        .and_then(|mut s| s.exists([&result.job_id, &result.host]))
        .ctx("look up host job")?;
    Ok(if exists { RecordOutcome::AlreadyFinal } else { RecordOutcome::Unknown })
}

fn mark_queued(conn: &Connection, job_id: &str, host: &str, queued: &QueueRef) -> Result<bool, StoreError> {
    let n = conn
        .prepare_cached(
            "UPDATE host_job SET state = 'ready', queue_job_id = ?3, queue_instance = ?4, envelope_mac = ?5,
                    updated_at = ?6, queued_at = ?6, queue_shard = ?7
             WHERE job_id = ?1 AND host = ?2 AND state = 'pending'",
        )
        .and_then(|mut s| {
            s.execute(params![job_id, host, queued.id as i64, queued.instance, queued.mac, unix_now_ms(), queued.shard])
        })
        .ctx("mark host job queued")?;
    Ok(n > 0)
}

fn apply_queued(
    conn: &Connection,
    job_id: &str,
    host: &str,
    queue_id: u64,
    change: &QueuedChange,
) -> Result<bool, StoreError> {
    let n = match change {
        QueuedChange::Finish(to, outcome) => conn
            .prepare_cached(
                "UPDATE host_job SET state = ?4, resp = ?5, retcode = ?6, message = ?7, data = ?8,
                        truncated = ?9, updated_at = ?10, finished_at = ?10, encoding = ?11
                 WHERE job_id = ?1 AND host = ?2 AND state = 'ready' AND queue_job_id = ?3",
            )
            .and_then(|mut s| {
                s.execute(params![
                    job_id,
                    host,
                    queue_id as i64,
                    to.as_str(),
                    outcome.resp.as_str(),
                    outcome.retcode,
                    outcome.message,
                    outcome.data,
                    outcome.truncated,
                    unix_now_ms(),
                    outcome.encoding.map(Encoding::as_str)
                ])
            })
            .ctx("finish queued host job")?,
        QueuedChange::Reserve => conn
            .prepare_cached(
                "UPDATE host_job SET state = 'reserved', updated_at = ?4
                 WHERE job_id = ?1 AND host = ?2 AND state = 'ready' AND queue_job_id = ?3",
            )
            .and_then(|mut s| s.execute(params![job_id, host, queue_id as i64, unix_now_ms()]))
            .ctx("mark host job reserved")?,
    };
    Ok(n > 0)
}

fn queue_ref(
    id: Option<i64>,
    shard: Option<String>,
    instance: Option<String>,
    mac: Option<String>,
) -> Option<QueueRef> {
    id.map(|id| QueueRef { id: id as u64, shard, instance, mac })
}

fn get_host(conn: &Connection, id: &str) -> Result<Option<HostRecord>, StoreError> {
    conn.prepare_cached("SELECT id, hostname, registered_at, last_seen FROM hosts WHERE id = ?1")
        .and_then(|mut s| s.query_row([id], host_from_row).optional())
        .ctx("read host")
}

fn host_from_row(row: &crate::db::Row) -> crate::db::Result<HostRecord> {
    Ok(HostRecord { id: row.get(0)?, hostname: row.get(1)?, registered_at_ms: row.get(2)?, last_seen_ms: row.get(3)? })
}

/// Reads a job row (the columns of [`JOB_COLUMNS`], in that order). The inner result
/// reports a method name this version does not know.
fn job_row(row: &crate::db::Row) -> crate::db::Result<Result<JobRecord, StoreError>> {
    let method: String = row.get(1)?;
    let Some(method) = Method::parse(&method) else {
        return Ok(Err(StoreError::Corrupt(format!("unknown method {method:?}"))));
    };
    Ok(Ok(JobRecord {
        id: row.get(0)?,
        method,
        cmd: row.get(2)?,
        timeout_secs: row.get(3)?,
        created_at_ms: row.get(4)?,
        start_by_ms: row.get(5)?,
        cancelled_at_ms: row.get(6)?,
        target: row.get(7)?,
        level: row.get(8)?,
        priority: row.get(9)?,
        task: match (row.get::<_, Option<String>>(10)?, row.get::<_, Option<String>>(11)?) {
            (Some(name), Some(from)) => Some(TaskOrigin { name, from }),
            _ => None,
        },
        policy: match row.get::<_, Option<String>>(12)? {
            None => crate::policy::Policy::default(),
            Some(text) => match serde_json::from_str(&text) {
                Ok(policy) => policy,
                Err(e) => return Ok(Err(StoreError::Corrupt(format!("job policy {text:?}: {e}")))),
            },
        },
        not_before_ms: row.get(13)?,
        current_batch: row.get(14)?,
        halted: row.get(15)?,
        args: row.get(16)?,
    }))
}

fn host_job_row(row: &crate::db::Row) -> crate::db::Result<Result<HostJobRecord, StoreError>> {
    let state: String = row.get(1)?;
    let state = match HostState::parse(&state) {
        Ok(state) => state,
        Err(e) => return Ok(Err(e)),
    };
    let resp: Option<String> = row.get(3)?;
    let outcome = match resp.as_deref() {
        None => None,
        Some(name) => {
            let resp = match name {
                "success" => Resp::Success,
                "failed" => Resp::Failed,
                other => return Ok(Err(StoreError::Corrupt(format!("unknown resp {other:?}")))),
            };
            let encoding = match row.get::<_, Option<String>>(9)?.as_deref() {
                None => None,
                Some(name) => match Encoding::parse(name) {
                    Some(encoding) => Some(encoding),
                    None => return Ok(Err(StoreError::Corrupt(format!("unknown encoding {name:?}")))),
                },
            };
            Some(Outcome {
                resp,
                retcode: row.get::<_, Option<u32>>(4)?.unwrap_or(0),
                message: row.get::<_, Option<String>>(5)?.unwrap_or_default(),
                data: row.get::<_, Option<String>>(6)?.unwrap_or_default(),
                encoding,
                truncated: row.get(7)?,
            })
        }
    };
    Ok(Ok(HostJobRecord {
        host: row.get(0)?,
        state,
        queued: queue_ref(row.get(2)?, row.get(15)?, row.get(10)?, row.get(11)?),
        outcome,
        updated_at_ms: row.get(8)?,
        attempt: row.get(12)?,
        batch: row.get(13)?,
        settled: row.get(14)?,
    }))
}

/// A new, empty PostgreSQL database on the server env `POLARIS_TEST_DATABASE` names, if
/// it names one.
#[cfg(test)]
pub(crate) fn test_database() -> Option<String> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let server = polaris_testkit::postgres::test_server_url()?;
    let name =
        format!("polaris_unit_{}_{}_{}", std::process::id(), unix_now_ms(), NEXT.fetch_add(1, Ordering::Relaxed));
    Some(polaris_testkit::postgres::create_database(&server, &name).expect("create a test database"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(file: &str, offset: u64, lines: &[&str]) -> polaris_ops_wire::wire::LogBatch {
        polaris_ops_wire::wire::LogBatch {
            v: 1,
            kind: "log".into(),
            host: "h".into(),
            task: "t".into(),
            path: "/var/log/x".into(),
            file: file.into(),
            offset,
            lines: lines.iter().map(|l| l.to_string()).collect(),
            lengths: lines.iter().map(|l| l.len() as u64 + 1).collect(),
            refused: None,
        }
    }

    #[test]
    fn log_lines_are_kept_once_and_within_retention() {
        let store = Store::open_for_test();
        let keep = LogRetention { max_lines: 3, max_age_ms: 86_400_000 };
        assert_eq!(store.record_log_batch(&batch("1:2:0", 0, &["a", "b"]), keep).expect("record"), 2);
        // Sent again (with one more line) after a crash: only the new line is added.
        assert_eq!(store.record_log_batch(&batch("1:2:0", 0, &["a", "b", "c"]), keep).expect("record"), 1);
        // Same offsets in the next incarnation (after a truncation) are other lines.
        assert_eq!(store.record_log_batch(&batch("1:2:1", 0, &["d"]), keep).expect("record"), 1);
        let lines = store.log_lines("h", "/var/log/x", 0, 100).expect("list");
        let texts: Vec<&str> = lines.iter().map(|l| l.line.as_str()).collect();
        assert_eq!(texts, ["b", "c", "d"], "at most max_lines are kept, the oldest go");
        assert_eq!(store.log_lines("h", "/var/log/x", lines[1].seq, 100).expect("list").len(), 1);
        let old = LogRetention { max_lines: 100, max_age_ms: -1 };
        store.record_log_batch(&batch("1:2:1", 2, &["e"]), old).expect("record");
        assert!(store.log_lines("h", "/var/log/x", 0, 100).expect("list").is_empty(), "all older than max age");
        let mut bad = batch("1:2:1", 4, &["f"]);
        bad.lengths.clear();
        assert!(matches!(store.record_log_batch(&bad, keep), Err(StoreError::Corrupt(_))));
        let mut refused = batch("", 0, &[]);
        refused.refused =
            Some(polaris_ops_wire::wire::Refusal { code: "path_not_allowed".into(), message: "outside".into() });
        store.record_log_batch(&refused, keep).expect("record");
        assert_eq!(store.log_refusal("h", "/var/log/x").expect("read").map(|r| r.0), Some("path_not_allowed".into()));
    }

    fn new_job(id: &str, hosts: &[&str]) -> NewJob {
        NewJob {
            id: id.to_string(),
            method: Method::SyncBash,
            cmd: "ls".into(),
            timeout_secs: 30,
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            token_name: None,
            target: None,
            level: "host".into(),
            priority: 100,
            task: None,
            policy: crate::policy::Policy::default(),
            args: None,
        }
    }

    #[test]
    fn unknown_hosts_fail_at_once_and_known_ones_wait() {
        let store = Store::open_for_test();
        store.upsert_host("a", "host-a").expect("register");
        assert!(store.create_job(&new_job("j1", &["a", "ghost"]), i64::MAX).expect("create"));
        let (job, hosts) = store.job("j1").expect("read").expect("exists");
        assert_eq!(job.cmd, "ls");
        assert_eq!(hosts[0].host, "a");
        assert_eq!(hosts[0].state, HostState::Pending);
        assert_eq!(hosts[1].state, HostState::Failed);
        let outcome = hosts[1].outcome.as_ref().expect("final");
        assert_eq!(outcome.retcode, u32::from(Code::NoSuchHost.value()));
        assert_eq!(outcome.message, "No such host");
        assert!(!store.create_job(&new_job("j1", &["a"]), i64::MAX).expect("second create"));
    }

    #[test]
    fn a_batch_of_results_is_recorded_in_one_go_each_with_its_outcome() {
        let store = Store::open_for_test();
        for host in ["a", "b"] {
            store.upsert_host(host, "").expect("register");
        }
        store.create_job(&new_job("j", &["a", "b"]), i64::MAX).expect("create");
        let result = |host: &str, retcode: u32| HostResult {
            v: 1,
            job_id: "j".into(),
            host: host.into(),
            resp: if retcode == 0 { Resp::Success } else { Resp::Failed },
            retcode,
            message: "m".into(),
            data: String::new(),
            encoding: None,
            truncated: false,
            output_bytes: 0,
            attempt: None,
        };
        let replayed = result("b", u32::from(Code::EnvelopeReplayed.value()));
        let (a, a_again, b, stranger) = (result("a", 0), result("a", 1), result("b", 0), result("c", 0));
        let outcomes = store.record_results(&[&a, &a_again, &replayed, &b, &stranger]).expect("record");
        use RecordOutcome::*;
        assert_eq!(outcomes, [Recorded, AlreadyFinal, Replayed, Recorded, Unknown]);
        let (_, hosts) = store.job("j").expect("read").expect("exists");
        let states: Vec<HostState> = hosts.iter().map(|h| h.state).collect();
        assert_eq!(states, [HostState::Success, HostState::Success], "the first answer of each host stands");
    }

    #[test]
    fn results_are_recorded_once_and_late_results_replace_expired() {
        let store = Store::open_for_test();
        store.upsert_host("a", "").expect("register");
        store.create_job(&new_job("j", &["a"]), i64::MAX).expect("create");
        let mut result = HostResult {
            v: 1,
            job_id: "j".into(),
            host: "a".into(),
            resp: Resp::Success,
            retcode: 0,
            message: "Normal termination".into(),
            data: "x".into(),
            encoding: None,
            truncated: false,
            output_bytes: 1,
            attempt: None,
        };
        let expired = Outcome::failed(Code::HostNoAnswer, "late");
        assert!(store.finish("j", "a", HostState::Pending, HostState::Expired, &expired).expect("expire"));
        assert_eq!(store.record_result(&result).expect("record"), RecordOutcome::Recorded);
        assert_eq!(store.record_result(&result).expect("again"), RecordOutcome::AlreadyFinal);
        result.host = "b".into();
        assert_eq!(store.record_result(&result).expect("unknown"), RecordOutcome::Unknown);
        assert!(store.job_is_final("j").expect("final"));
    }

    #[test]
    fn binary_results_keep_their_encoding() {
        let store = Store::open_for_test();
        store.upsert_host("a", "").expect("register");
        store.create_job(&new_job("j", &["a"]), i64::MAX).expect("create");
        let result = HostResult {
            v: 1,
            job_id: "j".into(),
            host: "a".into(),
            resp: Resp::Success,
            retcode: 0,
            message: "Normal termination".into(),
            data: "/wBh".into(),
            encoding: Some(Encoding::Base64),
            truncated: false,
            output_bytes: 3,
            attempt: None,
        };
        assert_eq!(store.record_result(&result).expect("record"), RecordOutcome::Recorded);
        let (_, hosts) = store.job("j").expect("read").expect("exists");
        let outcome = hosts[0].outcome.as_ref().expect("final");
        assert_eq!((outcome.data.as_str(), outcome.encoding), ("/wBh", Some(Encoding::Base64)));
    }

    #[test]
    fn queue_places_are_acted_on_only_while_they_hold() {
        let store = Store::open_for_test();
        store.upsert_host("a", "").expect("register");
        store.create_job(&new_job("j", &["a"]), i64::MAX).expect("create");
        let place = |id, instance: &str| QueueRef {
            id,
            shard: Some("q:1".into()),
            instance: Some(instance.into()),
            mac: Some("m".into()),
        };
        assert!(store.mark_queued("j", "a", &place(1, "old")).expect("mark"));
        assert!(!store.mark_queued("j", "a", &place(2, "old")).expect("only pending rows are marked"));
        assert!(store.ready_elsewhere("q:1", true, Some("old")).expect("list").is_empty());
        let elsewhere = store.ready_elsewhere("q:1", false, Some("new")).expect("list");
        assert_eq!(elsewhere.len(), 1);
        assert_eq!(elsewhere[0].queued, place(1, "old"));
        // Rows of another shard are not this one's, whatever their instance.
        assert!(store.ready_elsewhere("q:2", false, Some("new")).expect("list").is_empty());
        assert!(store.ready_elsewhere("q:2", true, None).expect("list").is_empty());
        assert_eq!(store.ready_elsewhere("q:1", false, None).expect("every ready row of the shard").len(), 1);
        assert_eq!(store.ready_shards().expect("shards"), ["q:1"]);
        // Another id than the stored one changes nothing.
        assert!(!store.requeue("j", "a", 7).expect("requeue"));
        assert!(store.requeue("j", "a", 1).expect("requeue"));
        let (_, hosts) = store.job("j").expect("read").expect("exists");
        assert_eq!((hosts[0].state, hosts[0].queued.clone()), (HostState::Pending, None));
        assert!(store.mark_queued("j", "a", &place(5, "new")).expect("mark"));
        let revoked = Outcome::failed(Code::Revoked, "r");
        assert!(!store.finish_queued("j", "a", 1, HostState::Revoked, &revoked).expect("stale id"));
        assert!(store.adopt("j", "a", 5, "newer").expect("adopt"));
        assert!(store.finish_queued("j", "a", 5, HostState::Revoked, &revoked).expect("finish"));
        assert!(store.job_is_final("j").expect("final"));
    }

    #[test]
    fn cancel_revokes_pending_hosts_in_one_go_and_stops_the_enqueuer() {
        let store = Store::open_for_test();
        for host in ["a", "b", "c"] {
            store.upsert_host(host, "").expect("register");
        }
        store.create_job(&new_job("j", &["a", "b", "c"]), i64::MAX).expect("create");
        let place = QueueRef { id: 1, shard: None, instance: Some("i".into()), mac: None };
        assert!(store.mark_queued_batch(&[("j".into(), "a".into(), place.clone())]).expect("mark")[0]);
        assert_eq!(store.pending(0, 10).expect("pending").len(), 2);
        // A row without a shard (stored before shards) is the first shard's.
        assert_eq!(store.ready_elsewhere("q:1", true, None).expect("first shard").len(), 1);
        assert!(store.ready_elsewhere("q:1", false, None).expect("another shard").is_empty());
        let revoked = Outcome::failed(Code::Revoked, "r");
        assert!(store.cancel_job("j", &revoked).expect("cancel"));
        assert!(!store.cancel_job("nope", &revoked).expect("cancel unknown"));
        assert!(store.job_cancelled("j").expect("cancelled"));
        assert!(store.pending(0, 10).expect("pending").is_empty());
        let (job, hosts) = store.job("j").expect("read").expect("exists");
        assert!(job.cancelled_at_ms.is_some());
        let states: Vec<HostState> = hosts.iter().map(|h| h.state).collect();
        assert_eq!(states, [HostState::Ready, HostState::Revoked, HostState::Revoked]);
        assert_eq!(store.ready_of_job("j").expect("ready"), [("a".to_string(), place)]);
        // Revoked while being put, then found taken by an agent: reserved again.
        assert!(store
            .revoked_but_taken("j", "b", &QueueRef { id: 2, shard: None, instance: None, mac: None })
            .expect("reopen"));
        let applied = store
            .apply_queued_batch("j", &[("a".into(), 1, QueuedChange::Reserve), ("c".into(), 3, QueuedChange::Reserve)])
            .expect("apply");
        assert_eq!(applied, [true, false]);
        let (_, hosts) = store.job("j").expect("read").expect("exists");
        let states: Vec<HostState> = hosts.iter().map(|h| h.state).collect();
        assert_eq!(states, [HostState::Reserved, HostState::Reserved, HostState::Revoked]);
    }

    #[test]
    fn leases_have_one_holder_until_they_run_out() {
        let store = Store::open_for_test();
        if store.backend() == crate::db::Backend::Sqlite {
            // One dispatcher per SQLite file: it holds every lease.
            assert!(store.hold_lease("work", "a", 60_000).expect("hold"));
            assert!(store.hold_lease("work", "b", 60_000).expect("hold"));
            return;
        }
        assert!(store.hold_lease("work", "a", 60_000).expect("take"));
        assert!(!store.hold_lease("work", "b", 60_000).expect("held by a"));
        assert!(store.hold_lease("work", "a", 60_000).expect("renew"));
        assert!(store.hold_lease("other", "b", 60_000).expect("another lease"));
        store.release_lease("work", "b").expect("not b's to release");
        assert!(!store.hold_lease("work", "b", 60_000).expect("still a's"));
        store.release_lease("work", "a").expect("release");
        // b takes it, and lets it run out at once; then a takes it back.
        assert!(store.hold_lease("work", "b", -1).expect("released, so free"));
        assert!(store.hold_lease("work", "a", 60_000).expect("run out, so free"));
    }

    #[test]
    fn migrations_are_idempotent() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(Store::open(dir.path()).expect("first open"));
        let store = Store::open(dir.path()).expect("second open");
        let version = crate::db::sqlite::schema_version(&store.conn()).expect("version");
        assert_eq!(version, crate::db::sqlite::MIGRATIONS.len() as i64);
        if let Some(url) = test_database() {
            let location = DatabaseLocation::Postgres(url);
            drop(Store::open_at(&location).expect("first open"));
            let store = Store::open_at(&location).expect("second open");
            let version = crate::db::postgres::schema_version(&store.conn()).expect("version");
            assert_eq!(version, crate::db::postgres::MIGRATIONS.len() as i64);
        }
    }
}
