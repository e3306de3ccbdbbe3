//! The SQLite backend: the embedded default, one file `dispatch.db` in `--data-dir`.
//!
//! The database runs in WAL mode with `synchronous=FULL` (the dispatcher writes little, and
//! "stored" must mean "on disk"); pragmas are set outside transactions; migrations are
//! append-only and keyed on `PRAGMA user_version`.

use super::{Connection, DbError, Kind, Result, Row, Value};
use rusqlite::types::{ToSqlOutput, ValueRef};
use std::path::Path;

/// Opens (creating if needed) the database file `path` and brings its schema up to date.
pub fn open(path: &Path) -> Result<Connection> {
    prepare(rusqlite::Connection::open(path)?)
}

/// Opens an in-memory database (tests).
pub fn open_in_memory() -> Result<Connection> {
    prepare(rusqlite::Connection::open_in_memory()?)
}

fn prepare(mut conn: rusqlite::Connection) -> Result<Connection> {
    // Pragmas first and outside any transaction: journal_mode cannot change inside one.
    let _mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))?;
    conn.execute_batch("PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;")?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    migrate(&mut conn)?;
    Ok(Connection::Sqlite(conn))
}

/// The schema version of an SQLite database (its `user_version`).
pub fn schema_version(conn: &Connection) -> Result<i64> {
    conn.query_row("PRAGMA user_version", (), |row| row.get(0))
}

fn migrate(conn: &mut rusqlite::Connection) -> Result<()> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(usize::try_from(version).unwrap_or(0)) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql).map_err(|e| DbError::Migration(format!("SQLite migration {}: {e}", index + 1)))?;
        // user_version is set inside the migration's transaction so a crash never leaves
        // a half-applied schema marked as done.
        tx.execute_batch(&format!("PRAGMA user_version = {}", index + 1))?;
        tx.commit()?;
    }
    Ok(())
}

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            Value::Null(_) => ToSqlOutput::Borrowed(ValueRef::Null),
            Value::Int(v) => ToSqlOutput::Borrowed(ValueRef::Integer(*v)),
            Value::Real(v) => ToSqlOutput::Borrowed(ValueRef::Real(*v)),
            Value::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
        })
    }
}

pub(super) fn execute(conn: &rusqlite::Connection, sql: &str, values: &[Value]) -> Result<usize> {
    let mut statement = conn.prepare_cached(sql)?;
    if statement.column_count() > 0 {
        // A statement that returns rows (`… RETURNING`) must be stepped through them.
        let mut rows = statement.query(rusqlite::params_from_iter(values))?;
        let mut n = 0;
        while rows.next()?.is_some() {
            n += 1;
        }
        return Ok(n);
    }
    Ok(statement.execute(rusqlite::params_from_iter(values))?)
}

pub(super) fn query(conn: &rusqlite::Connection, sql: &str, values: &[Value]) -> Result<Vec<Row>> {
    let mut statement = conn.prepare_cached(sql)?;
    let columns = statement.column_count();
    let mut rows = statement.query(rusqlite::params_from_iter(values))?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let mut values = Vec::with_capacity(columns);
        for index in 0..columns {
            values.push(match row.get_ref(index)? {
                ValueRef::Null => Value::Null(Kind::Text),
                ValueRef::Integer(v) => Value::Int(v),
                ValueRef::Real(v) => Value::Real(v),
                ValueRef::Text(bytes) => Value::Text(
                    std::str::from_utf8(bytes)
                        .map_err(|e| DbError::Decode { index, message: format!("text that is not UTF-8: {e}") })?
                        .to_string(),
                ),
                ValueRef::Blob(_) => {
                    return Err(DbError::Decode { index, message: "a blob, which no dispatcher column holds".into() })
                }
            });
        }
        out.push(Row { values });
    }
    Ok(out)
}

/// Append-only schema migrations; entry `i` moves the database to `user_version = i + 1`.
/// Never edit an entry that has shipped: add a new one.
pub const MIGRATIONS: &[&str] = &[
    // 1: the design's three tables.
    "CREATE TABLE hosts (
        id            TEXT PRIMARY KEY,
        hostname      TEXT NOT NULL DEFAULT '',
        registered_at INTEGER NOT NULL,
        last_seen     INTEGER NOT NULL
    );
    CREATE TABLE jobs (
        seq          INTEGER PRIMARY KEY AUTOINCREMENT,
        id           TEXT NOT NULL UNIQUE,
        method       TEXT NOT NULL,
        cmd          TEXT NOT NULL,
        timeout_secs INTEGER NOT NULL,
        created_at   INTEGER NOT NULL,
        start_by     INTEGER NOT NULL,
        token_name   TEXT
    );
    CREATE TABLE host_job (
        job_id       TEXT NOT NULL REFERENCES jobs(id),
        position     INTEGER NOT NULL,
        host         TEXT NOT NULL,
        state        TEXT NOT NULL,
        queue_job_id INTEGER,
        resp         TEXT,
        retcode      INTEGER,
        message      TEXT,
        data         TEXT,
        truncated    INTEGER NOT NULL DEFAULT 0,
        output_bytes INTEGER,
        updated_at   INTEGER NOT NULL,
        finished_at  INTEGER,
        PRIMARY KEY (job_id, position),
        UNIQUE (job_id, host)
    );
    CREATE INDEX host_job_open ON host_job(state) WHERE state IN ('pending', 'ready', 'reserved');",
    // 2: output that is not UTF-8 is kept as base64 in `data`; `encoding` says so.
    "ALTER TABLE host_job ADD COLUMN encoding TEXT;",
    // 3: which queue instance issued a host job's queue job id, and the signature of the
    // envelope put under it, so the id is never acted on without proof it is still ours.
    "ALTER TABLE host_job ADD COLUMN queue_instance TEXT;
     ALTER TABLE host_job ADD COLUMN envelope_mac TEXT;",
    // 4: when `DELETE /v1/jobs/{id}` cancelled the job; the enqueuer puts none of its
    // envelopes from then on.
    "ALTER TABLE jobs ADD COLUMN cancelled_at INTEGER;",
    // 5: the fleet: the product tree, where hosts sit in it, their labels, the log of every
    // change to them, and the facts agents report when they register. A node keeps its
    // `id` when it is renamed or moved, so whatever attaches to nodes later (standing
    // tasks) references `fleet_nodes(id)`; hosts are referenced by their id, which the
    // inventory may name before the host's agent ever registers (hence no foreign key to
    // `hosts`, and registration never touches these tables).
    "CREATE TABLE fleet_nodes (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        parent_id  INTEGER REFERENCES fleet_nodes(id),
        path       TEXT NOT NULL UNIQUE,
        level      TEXT NOT NULL CHECK (level IN ('product', 'service', 'component')),
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    );
    CREATE INDEX fleet_nodes_parent ON fleet_nodes(parent_id);
    CREATE TABLE fleet_placements (
        host       TEXT NOT NULL,
        node_id    INTEGER NOT NULL REFERENCES fleet_nodes(id),
        created_at INTEGER NOT NULL,
        PRIMARY KEY (host, node_id)
    );
    CREATE INDEX fleet_placements_node ON fleet_placements(node_id);
    CREATE TABLE fleet_labels (
        host  TEXT NOT NULL,
        key   TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (host, key)
    );
    CREATE INDEX fleet_labels_pair ON fleet_labels(key, value);
    CREATE TABLE fleet_audit (
        seq     INTEGER PRIMARY KEY AUTOINCREMENT,
        at      INTEGER NOT NULL,
        actor   TEXT,
        client  TEXT,
        action  TEXT NOT NULL,
        subject TEXT NOT NULL,
        before  TEXT,
        after   TEXT
    );
    CREATE INDEX fleet_audit_subject ON fleet_audit(subject, seq);
    ALTER TABLE hosts ADD COLUMN facts TEXT;
    ALTER TABLE hosts ADD COLUMN facts_at INTEGER;",
    // 6: what a job was targeted at (the request's `target` as JSON, absent for a host
    // list), the level that gives, and the queue priority its envelopes are put with.
    // Rows from before have none of them: host-level, priority by method as before.
    "ALTER TABLE jobs ADD COLUMN target TEXT;
     ALTER TABLE jobs ADD COLUMN level TEXT;
     ALTER TABLE jobs ADD COLUMN priority INTEGER;",
    // 7: standing tasks, keyed by name and attach point (a node, or one host by id). A
    // deleted node takes its tasks with it.
    "CREATE TABLE fleet_tasks (
        name       TEXT NOT NULL,
        node_id    INTEGER REFERENCES fleet_nodes(id) ON DELETE CASCADE,
        host       TEXT,
        kind       TEXT NOT NULL,
        spec       TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        CHECK ((node_id IS NULL) <> (host IS NULL))
    );
    CREATE UNIQUE INDEX fleet_tasks_node ON fleet_tasks(name, node_id) WHERE node_id IS NOT NULL;
    CREATE UNIQUE INDEX fleet_tasks_host ON fleet_tasks(name, host) WHERE host IS NOT NULL;
    CREATE INDEX fleet_tasks_by_node ON fleet_tasks(node_id);",
    // 8: the scheduler. A `schedule` task's next due slot (NULL: not planned yet, or its
    // spec changed, so the next slot is counted from now); the history of its firings,
    // one row each, with the job it became (NULL when it fired for no host or the slot
    // was skipped); and the task a job was fired for (its name and the attach point it
    // came from: a node path or `host`).
    "ALTER TABLE fleet_tasks ADD COLUMN next_due_at INTEGER;
    CREATE TABLE fleet_task_runs (
        seq      INTEGER PRIMARY KEY AUTOINCREMENT,
        name     TEXT NOT NULL,
        origin   TEXT NOT NULL,
        due_at   INTEGER NOT NULL,
        fired_at INTEGER NOT NULL,
        job_id   TEXT,
        hosts    INTEGER NOT NULL,
        missed   INTEGER NOT NULL DEFAULT 0,
        outcome  TEXT NOT NULL
    );
    CREATE INDEX fleet_task_runs_name ON fleet_task_runs(name, seq);
    ALTER TABLE jobs ADD COLUMN task_name TEXT;
    ALTER TABLE jobs ADD COLUMN task_from TEXT;
    ALTER TABLE hosts ADD COLUMN tasks_digest TEXT;
    ALTER TABLE hosts ADD COLUMN tasks_digest_at INTEGER;",
    // 9: execution control. A job's policy (JSON, NULL for none), the time before which
    // no host starts, the batch running and when it ended, and why no further host starts
    // (a crossed failure threshold). A host job's own start deadline (NULL: the job's),
    // its attempt, batch, when a retry may start, whether the rollout has looked at its
    // final answer (0 only for jobs that retry), when its envelope was put, and when it
    // alone was cancelled. `waiting` hosts are held back by the policy; `skipped` and
    // `cancelled` are final. Every finished attempt of a retrying job is kept.
    "ALTER TABLE jobs ADD COLUMN policy TEXT;
    ALTER TABLE jobs ADD COLUMN not_before INTEGER;
    ALTER TABLE jobs ADD COLUMN current_batch INTEGER;
    ALTER TABLE jobs ADD COLUMN batch_done_at INTEGER;
    ALTER TABLE jobs ADD COLUMN halted TEXT;
    ALTER TABLE host_job ADD COLUMN start_by INTEGER;
    ALTER TABLE host_job ADD COLUMN attempt INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE host_job ADD COLUMN batch INTEGER;
    ALTER TABLE host_job ADD COLUMN retry_at INTEGER;
    ALTER TABLE host_job ADD COLUMN settled INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE host_job ADD COLUMN queued_at INTEGER;
    ALTER TABLE host_job ADD COLUMN cancelled_at INTEGER;
    ALTER TABLE host_job ADD COLUMN cancel_sent_at INTEGER;
    CREATE TABLE host_attempts (
        job_id      TEXT NOT NULL,
        host        TEXT NOT NULL,
        attempt     INTEGER NOT NULL,
        queued_at   INTEGER,
        finished_at INTEGER NOT NULL,
        state       TEXT NOT NULL,
        resp        TEXT,
        retcode     INTEGER,
        message     TEXT,
        PRIMARY KEY (job_id, host, attempt)
    );
    DROP INDEX host_job_open;
    CREATE INDEX host_job_open ON host_job(state) WHERE state IN ('pending', 'ready', 'reserved', 'waiting');
    CREATE INDEX host_job_unsettled ON host_job(job_id) WHERE settled = 0;",
    // 10: the events of each job, for `GET /v1/jobs/{id}/events`: every host's state
    // (and attempt) as it changes, the batch that starts, a crossed threshold, a cancel.
    // Triggers write them in the transaction of the change itself, so no code path that
    // moves a host can forget one. Jobs from before get one event per host, as they stand.
    "CREATE TABLE job_events (
        seq    INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id TEXT NOT NULL,
        at     INTEGER NOT NULL,
        kind   TEXT NOT NULL,
        host   TEXT,
        body   TEXT NOT NULL
    );
    CREATE INDEX job_events_job ON job_events(job_id, seq);
    CREATE TRIGGER job_events_host_new AFTER INSERT ON host_job BEGIN
        INSERT INTO job_events (job_id, at, kind, host, body) VALUES (NEW.job_id, NEW.updated_at, 'host', NEW.host,
            json_object('host', NEW.host, 'state', NEW.state, 'attempt', NEW.attempt, 'batch', NEW.batch + 1,
                        'resp', NEW.resp, 'retcode', NEW.retcode, 'message', NEW.message));
    END;
    CREATE TRIGGER job_events_host_state AFTER UPDATE OF state, attempt ON host_job
    WHEN OLD.state IS NOT NEW.state OR OLD.attempt IS NOT NEW.attempt BEGIN
        INSERT INTO job_events (job_id, at, kind, host, body) VALUES (NEW.job_id, NEW.updated_at, 'host', NEW.host,
            json_object('host', NEW.host, 'state', NEW.state, 'attempt', NEW.attempt, 'batch', NEW.batch + 1,
                        'resp', NEW.resp, 'retcode', NEW.retcode, 'message', NEW.message, 'data', NEW.data,
                        'encoding', NEW.encoding, 'truncated', NEW.truncated));
    END;
    CREATE TRIGGER job_events_batch AFTER UPDATE OF current_batch ON jobs
    WHEN OLD.current_batch IS NOT NEW.current_batch BEGIN
        INSERT INTO job_events (job_id, at, kind, body)
        VALUES (NEW.id, CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER), 'batch',
                json_object('current', NEW.current_batch + 1));
    END;
    CREATE TRIGGER job_events_halted AFTER UPDATE OF halted ON jobs
    WHEN OLD.halted IS NOT NEW.halted BEGIN
        INSERT INTO job_events (job_id, at, kind, body)
        VALUES (NEW.id, CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER), 'halted',
                json_object('reason', NEW.halted));
    END;
    CREATE TRIGGER job_events_cancelled AFTER UPDATE OF cancelled_at ON jobs
    WHEN OLD.cancelled_at IS NULL AND NEW.cancelled_at IS NOT NULL BEGIN
        INSERT INTO job_events (job_id, at, kind, body)
        VALUES (NEW.id, NEW.cancelled_at, 'cancelled', json_object('at_ms', NEW.cancelled_at));
    END;
    INSERT INTO job_events (job_id, at, kind, host, body)
        SELECT job_id, updated_at, 'host', host,
               json_object('host', host, 'state', state, 'attempt', attempt, 'batch', batch + 1, 'resp', resp,
                           'retcode', retcode, 'message', message, 'data', data, 'encoding', encoding,
                           'truncated', truncated)
        FROM host_job ORDER BY rowid;",
    // 11: a job's `args` (the `log.*` methods' arguments) as JSON text; absent for every
    // other method and for jobs stored before.
    "ALTER TABLE jobs ADD COLUMN args TEXT;",
    // 12: what the agents' standing tasks report. Continuous-integrity reports (only
    // changes since the task's last report; `seq` is the agent's number for it) and the
    // lines of watched log files, each named once by its file incarnation and offset, so
    // a batch an agent sends again after a crash adds nothing.
    "CREATE TABLE integrity_reports (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        host        TEXT NOT NULL,
        task        TEXT NOT NULL,
        seq         INTEGER NOT NULL,
        at          INTEGER NOT NULL,
        received_at INTEGER NOT NULL,
        retcode     INTEGER NOT NULL,
        message     TEXT NOT NULL,
        report      TEXT NOT NULL,
        UNIQUE (host, task, seq, at)
    );
    CREATE INDEX integrity_reports_by_task ON integrity_reports (host, task, id);
    CREATE TABLE log_lines (
        seq    INTEGER PRIMARY KEY AUTOINCREMENT,
        host   TEXT NOT NULL,
        path   TEXT NOT NULL,
        file   TEXT NOT NULL,
        offset INTEGER NOT NULL,
        at     INTEGER NOT NULL,
        line   TEXT NOT NULL,
        UNIQUE (host, path, file, offset)
    );
    CREATE INDEX log_lines_by_path ON log_lines (host, path, seq);
    CREATE INDEX log_lines_by_age ON log_lines (at);
    CREATE TABLE log_refusals (
        host    TEXT NOT NULL,
        path    TEXT NOT NULL,
        task    TEXT NOT NULL,
        code    TEXT NOT NULL,
        message TEXT NOT NULL,
        at      INTEGER NOT NULL,
        PRIMARY KEY (host, path)
    );",
    // 13: the queue shard holding a host job's envelope (`--queue` with several
    // addresses); NULL is the first shard, which is where every older row is.
    "ALTER TABLE host_job ADD COLUMN queue_shard TEXT;",
];
