//! Durability: jobs, final states and tube settings in a SQLite database.
//!
//! The store holds the *current* state of every live job, not a log of
//! commands: each loop turn, the rows of the jobs that changed are rewritten
//! (or removed) in one transaction. So the file stays proportional to the live
//! jobs, a job put and deleted in the same turn never reaches the disk, and a
//! restart is one table scan.
//!
//! A reserved job is stored as ready (it comes back ready, as in beanstalkd),
//! so reserves and TTR timeouts write nothing. Delays and TTLs are stored as
//! wall-clock deadlines, so time spent down counts.
//!
//! fsync policy (beanstalkd's `-f`/`-F`):
//! - `Always` (`-f 0`): the WAL is fsynced after every commit, before any reply
//!   of its turns is sent. Survives process crash and power loss.
//! - `Interval(ms)`: commits reach the OS before replies are sent (so they
//!   survive a process crash); a background thread fsyncs the WAL at most every
//!   `ms`, so a power loss can lose the last `ms` of acknowledged work, and the
//!   event loop never waits for the disk.
//! - `Never` (`-F`): as `Interval` for process crashes; after a power loss,
//!   whatever the OS had not written back is lost.
//!
//! SQLite runs with `synchronous=NORMAL` in every mode: its commits do not fsync,
//! its checkpoints do, in the order that keeps the file consistent. Under `-f 0` the
//! store fsyncs the WAL itself after each commit, which is what `FULL` would do, but
//! with `fdatasync`: SQLite's bundled build calls `fsync`, which also writes the
//! file's timestamps and so costs a file-system journal commit every time.

use polaris_engine::{Changes, Engine, FinalState, JobCounters, JobId, JobRecord, JobState, Nanos, Tombstone, SECOND};
use polaris_proto::TubeName;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// File name of the database inside the `-b` directory.
pub const DB_FILE: &str = "polaris.db";
/// Page size of a new database. Every commit writes whole pages to the WAL (a put
/// rewrites a table leaf and the id high-water mark, a delete two or three more pages),
/// and with SQLite's default of 4 KiB that came to 11 KB per commit: 115 MB/s of
/// writeback at 10,000 jobs/s, which the put-to-reserve tail paid for (BENCHMARKS.md,
/// 2026-12-08). 1 KiB pages write 3.5 times less, for slightly deeper trees. A database
/// made with another page size keeps it.
pub const PAGE_SIZE: u32 = 1024;
/// File name of the lock that keeps a second server off the same directory.
pub const LOCK_FILE: &str = "polaris.lock";

/// Schema migrations, applied in order; `PRAGMA user_version` counts how many
/// have run. Append only: never edit a released step.
const MIGRATIONS: &[&str] = &[
    // 1: jobs, final states, tube TTL defaults, and the id high-water mark.
    "CREATE TABLE jobs (
        id INTEGER PRIMARY KEY,
        tube TEXT NOT NULL,
        pri INTEGER NOT NULL,
        delay_ns INTEGER NOT NULL,
        ttr_ns INTEGER NOT NULL,
        ttl_ns INTEGER,
        ttl_at INTEGER,
        state INTEGER NOT NULL,
        ready_at INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        reserves INTEGER NOT NULL,
        timeouts INTEGER NOT NULL,
        releases INTEGER NOT NULL,
        buries INTEGER NOT NULL,
        kicks INTEGER NOT NULL,
        body BLOB NOT NULL
    );
    CREATE TABLE tombstones (id INTEGER PRIMARY KEY, state TEXT NOT NULL, at INTEGER NOT NULL);
    CREATE TABLE tube_ttls (tube TEXT PRIMARY KEY, ttl INTEGER NOT NULL);
    CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
    INSERT INTO meta (key, value) VALUES ('last_id', 0);",
];

/// A store failure, with the file it concerns.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened or is not usable.
    #[error("{path}: {message}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// SQLite failed.
    #[error("{path}: {source}")]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// The SQLite error.
        #[source]
        source: rusqlite::Error,
    },
    /// Not attempted: an earlier commit failed and has not been retried yet, and changes
    /// are only ever written after the ones before them (see `pipeline.rs`).
    #[error("not written: an earlier commit failed")]
    Refused,
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// When the store fsyncs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Before every acknowledgement (`-f 0`).
    Always,
    /// At most once per interval (`-f MS`).
    Interval(Duration),
    /// Never (`-F`).
    Never,
}

/// Persistence settings (`-b`).
#[derive(Clone, Debug)]
pub struct Durability {
    /// Directory of the database.
    pub dir: PathBuf,
    /// fsync policy.
    pub fsync: FsyncPolicy,
    /// WAL size that triggers a checkpoint.
    pub wal_size: u64,
    /// Largest database file; 0 for no bound.
    pub max_bytes: u64,
    /// Start even when the WAL is damaged or the database file empty, keeping what is
    /// readable (`--salvage`).
    pub salvage: bool,
}

impl StoreError {
    /// Whether the store failed for want of space (a full disk, or `--max-db-bytes`):
    /// commands that need new space are refused (`OUT_OF_MEMORY`), as beanstalkd refuses a
    /// `put` whose binlog space it cannot reserve.
    pub fn is_full(&self) -> bool {
        match self {
            StoreError::Sqlite { source: rusqlite::Error::SqliteFailure(e, _), .. } => {
                e.code == rusqlite::ErrorCode::DiskFull
            }
            StoreError::Io { source, .. } => source.raw_os_error() == Some(28), // ENOSPC
            _ => false,
        }
    }
}

/// Counters for `stats`.
#[derive(Clone, Copy, Debug, Default)]
pub struct StoreStats {
    /// Rows written or deleted since start.
    pub records_written: u64,
}

impl From<StoreStats> for polaris_engine::BinlogStats {
    fn from(s: StoreStats) -> Self {
        polaris_engine::BinlogStats { records_written: s.records_written, records_migrated: 0 }
    }
}

/// The store's commit and fsync figures for `--metrics`: prometheus types, lock-free and
/// shared with the metrics thread, so recording one costs the event loop a few atomic adds.
#[derive(Clone, Debug)]
pub struct StoreMetrics {
    /// Transactions committed (turns that changed something durable).
    pub commits: prometheus::IntCounter,
    /// Commits that failed (and were retried or refused; see `ARCHITECTURE.md` § 4).
    pub commit_failures: prometheus::IntCounter,
    /// How long each committed transaction took, on the writer or on the event loop; under
    /// `-f 0` this includes the store's fsync of the WAL after it.
    pub commit_seconds: prometheus::Histogram,
    /// How long each fsync of the write-ahead log took: after every commit under `-f 0`,
    /// by the background thread under `-f MS`, and the last one at shutdown.
    pub fsync_seconds: prometheus::Histogram,
    /// How long the writer spent finishing each checkpoint so that the WAL can restart;
    /// commits wait meanwhile.
    pub checkpoint_seconds: prometheus::Histogram,
}

impl StoreMetrics {
    fn new() -> StoreMetrics {
        let histogram = |name: &str, help: &str| {
            prometheus::Histogram::with_opts(
                prometheus::HistogramOpts::new(name, help).buckets(polaris_metrics::buckets::STORAGE_SECONDS.to_vec()),
            )
            .expect("constant histogram options are valid")
        };
        let counter = |name: &str, help: &str| {
            prometheus::IntCounter::new(name, help).expect("constant counter options are valid")
        };
        StoreMetrics {
            commits: counter("polarisd_store_commits_total", "Transactions committed to the store."),
            commit_failures: counter("polarisd_store_commit_failures_total", "Store commits that failed."),
            commit_seconds: histogram(
                "polarisd_store_commit_seconds",
                "Time one commit took on the event loop (with -f 0 it includes the fsync).",
            ),
            fsync_seconds: histogram(
                "polarisd_store_fsync_seconds",
                "Time one fsync of the write-ahead log took (-f 0: after each commit; -f MS: the periodic one).",
            ),
            checkpoint_seconds: histogram(
                "polarisd_store_checkpoint_seconds",
                "Time the writer spent finishing one checkpoint of the write-ahead log (commits wait meanwhile).",
            ),
        }
    }
}

/// The open database.
pub struct Store {
    conn: Connection,
    path: PathBuf,
    /// Kept open for the life of the store: holds the directory lock.
    _lock: File,
    /// The highest job id known to be on disk: in the `meta` row, or the id of a job or
    /// final state row.
    last_id_written: u64,
    /// The id in the `meta` row, which is rewritten only when no row shows the highest id
    /// (see [`Store::write`]).
    meta_last_id: u64,
    /// The background thread that checkpoints the WAL (and fsyncs it under `-f MS`).
    maintainer: Option<Maintainer>,
    /// Fault injection for tests (see [`FAIL_COMMITS_ENV`]).
    fail_while: Option<PathBuf>,
    /// Fault injection for tests (see [`SLOW_COMMITS_ENV`]).
    slow_commits: Option<Duration>,
    /// `-f 0`: the WAL is fsynced after every commit.
    sync_each_commit: bool,
    /// The WAL, opened on the first fsync after a commit.
    wal_file: Option<File>,
    /// Fault injection for tests (see [`FAIL_SYNCS_ENV`]).
    fail_syncs_while: Option<PathBuf>,
    stats: StoreStats,
    metrics: StoreMetrics,
}

fn wall_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64)
}

/// Fault injection for tests: while the file this variable names exists, every commit fails
/// as if the disk returned an I/O error. Unset (as always outside tests), it costs nothing.
pub const FAIL_COMMITS_ENV: &str = "POLARISD_FAIL_COMMITS_WHILE";

/// Fault injection for tests: every commit first sleeps this many milliseconds, as on a
/// disk much slower than the clients, so that commits queue up in the pipeline.
pub const SLOW_COMMITS_ENV: &str = "POLARISD_SLOW_COMMITS_MS";

/// Fault injection for tests: under `-f 0`, while the file this variable names exists, the
/// fsync of the WAL after each commit fails (as `EIO` from a failing disk would), after
/// SQLite has committed.
pub const FAIL_SYNCS_ENV: &str = "POLARISD_FAIL_WAL_SYNCS_WHILE";

/// The largest job body the store can keep: SQLite refuses a value (and a row) over
/// 1,000,000,000 bytes, so every commit of a bigger job would fail. The rest of the row
/// (tube name and numbers) needs well under the margin left here.
pub const MAX_STORED_BODY: u32 = 999_990_000;

/// The columns of the `jobs` table that a restart reads, in the order `job_from_row` expects.
const JOB_COLUMNS: &[&str] = &[
    "id",
    "tube",
    "pri",
    "delay_ns",
    "ttr_ns",
    "ttl_ns",
    "ttl_at",
    "state",
    "ready_at",
    "created_at",
    "reserves",
    "timeouts",
    "releases",
    "buries",
    "kicks",
    "body",
];

/// Refuses a database whose opening would silently lose acknowledged jobs, unless
/// `salvage` is set: a WAL with committed transactions after a damaged frame (SQLite would
/// drop them without a word), or an empty database file with no WAL (a file that held
/// jobs and was truncated looks exactly like that).
fn check_before_open(db: &Path, salvage: bool) -> Result<(), StoreError> {
    let wal_path = wal_file(db);
    let refuse = |message: String| StoreError::Open { path: db.to_path_buf(), message };
    let wal =
        crate::wal::inspect_file(&wal_path).map_err(|source| StoreError::Io { path: wal_path.clone(), source })?;
    if let Some(report) = wal.as_ref().filter(|r| r.loses_commits()) {
        let damaged = report.damaged_frame.unwrap_or(0);
        let what = format!(
            "the write-ahead log {} is damaged at frame {damaged}: {} committed transaction(s) after it would be \
             lost ({} frames before it are intact)",
            wal_path.display(),
            report.commits_lost,
            report.valid_frames
        );
        if !salvage {
            return Err(refuse(format!(
                "{what}; refusing to start. Start with --salvage to keep what comes before the damage (the log is \
                 copied aside first)"
            )));
        }
        let copy = wal_path.with_extension(format!("db-wal.damaged-{}", wall_now() / 1_000_000_000));
        std::fs::copy(&wal_path, &copy).map_err(|source| StoreError::Io { path: copy.clone(), source })?;
        log::error!(
            "{}: {what}; --salvage: starting without them, the damaged log is kept as {}",
            db.display(),
            copy.display()
        );
    }
    let empty_db = std::fs::metadata(db).is_ok_and(|m| m.len() == 0);
    if empty_db && wal.is_none() {
        if !salvage {
            return Err(refuse(
                "the database file is empty (0 bytes) and there is no write-ahead log: if it held jobs they are \
                 gone; refusing to start. Remove the file, or start with --salvage, to begin with no jobs"
                    .into(),
            ));
        }
        log::error!("{}: the database file is empty; --salvage: starting with no jobs", db.display());
    }
    Ok(())
}

/// SQLite's WAL file of the database at `db`.
fn wal_file(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push("-wal");
    PathBuf::from(name)
}

fn state_code(state: JobState) -> i64 {
    match state {
        JobState::Ready | JobState::Reserved => 0,
        JobState::Delayed => 1,
        JobState::Buried => 2,
    }
}

/// One or more turns' changes as the store writes them: owned rows, taken from the engine
/// when the turn ends, so that the thread that writes them needs nothing of the engine and
/// the event loop goes on changing it meanwhile. Wall-clock deadlines are computed when the
/// batch is taken, as the rows say where each job stood then.
#[derive(Debug, Default)]
pub struct Batch {
    jobs: Vec<JobWrite>,
    /// (id, final state, wall-clock time).
    tombstones: Vec<(i64, &'static str, i64)>,
    forgotten: Vec<i64>,
    tube_ttls: Vec<(TubeName, u32)>,
    /// The highest job id issued when the batch was taken.
    last_id: u64,
    /// Roughly how much memory the batch holds (bodies and rows), for the pipeline's bound.
    bytes: usize,
}

#[derive(Debug)]
enum JobWrite {
    /// A job created in the batch's turn, with its body.
    Insert(JobRow, Box<[u8]>),
    /// A job whose row exists: its queue fields (never the body).
    Update(JobRow),
    /// A job no longer live.
    Delete(i64),
}

/// The queue fields of one `jobs` row.
#[derive(Debug)]
struct JobRow {
    id: i64,
    tube: TubeName,
    pri: u32,
    delay_ns: i64,
    ttr_ns: i64,
    ttl_ns: Option<i64>,
    ttl_at: Option<i64>,
    state: i64,
    ready_at: i64,
    created_at: i64,
    counters: JobCounters,
}

/// What one row costs in a batch besides its body (an estimate; it only bounds memory).
const ROW_BYTES: usize = 128;

impl Batch {
    /// The rows of everything in `changes`, as the engine (whose clock reads `now`) has it now.
    pub fn snapshot(changes: &Changes, engine: &Engine, now: Nanos) -> Batch {
        let wall = wall_now();
        let mut batch = Batch { last_id: engine.last_id(), ..Batch::default() };
        batch.jobs.reserve(changes.jobs.len());
        for &id in &changes.jobs {
            let Some(rec) = engine.job_record(id, now) else {
                batch.jobs.push(JobWrite::Delete(id.0 as i64));
                continue;
            };
            let ready_at = wall_after(wall, rec.delay_left);
            let ttl_at = rec.ttl_left.map(|left| wall_after(wall, left)).or(match (rec.state, rec.ttl) {
                (JobState::Delayed, Some(ttl)) => Some(wall_after(ready_at, ttl)),
                _ => None,
            });
            let row = JobRow {
                id: id.0 as i64,
                tube: rec.tube.clone(),
                pri: rec.pri,
                delay_ns: i64::from(rec.delay_secs) * SECOND as i64,
                ttr_ns: i64::from(rec.ttr_secs) * SECOND as i64,
                ttl_ns: rec.ttl.map(nanos_column),
                ttl_at,
                state: state_code(rec.state),
                ready_at,
                created_at: wall.saturating_sub(nanos_column(rec.age)),
                counters: rec.counters,
            };
            if changes.inserted.contains(&id) {
                batch.bytes += rec.body.len();
                batch.jobs.push(JobWrite::Insert(row, rec.body.into()));
            } else {
                batch.jobs.push(JobWrite::Update(row));
            }
        }
        batch.tombstones = changes
            .tombstones
            .iter()
            .map(|t| (t.id.0 as i64, t.state.name(), wall.saturating_sub(nanos_column(now.saturating_sub(t.at)))))
            .collect();
        batch.forgotten = changes.forgotten.iter().map(|id| id.0 as i64).collect();
        batch.tube_ttls = changes.tube_ttls.clone();
        batch.bytes += ROW_BYTES * (batch.jobs.len() + batch.tombstones.len() + batch.forgotten.len());
        batch
    }

    /// True when the batch writes no row (it may still carry a higher `last_id`).
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty() && self.tombstones.is_empty() && self.forgotten.is_empty() && self.tube_ttls.is_empty()
    }

    /// Roughly how many bytes of memory the batch holds.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Store {
    /// Opens (or creates) the database in `dir`. A file that is not a SQLite
    /// database, or has a newer schema, is refused and left untouched.
    /// `max_bytes` bounds the database file (0: no bound); a commit that would
    /// grow it further fails like a full disk.
    pub fn open(settings: &Durability) -> Result<Store, StoreError> {
        let Durability { dir, fsync, wal_size, max_bytes, salvage } = settings;
        let (dir, fsync, wal_size, max_bytes) = (dir.as_path(), *fsync, *wal_size, *max_bytes);
        let path = dir.join(DB_FILE);
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let lock = lock_dir(dir)?;
        let sql = |source| StoreError::Sqlite { path: path.clone(), source };
        let existed = path.exists();
        // Before SQLite opens the files (which replays the WAL and may rewrite it), make
        // sure that opening loses nothing that was acknowledged.
        check_before_open(&path, *salvage)?;
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(&path, flags).map_err(sql)?;
        // Validate before changing anything: a damaged or foreign file must be
        // left exactly as it was found.
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(|e| StoreError::Open {
            path: path.clone(),
            message: format!("not a usable SQLite database: {e}"),
        })?;
        if version > MIGRATIONS.len() as i64 {
            return Err(StoreError::Open {
                path,
                message: format!(
                    "schema version {version} is newer than this polarisd understands ({})",
                    MIGRATIONS.len()
                ),
            });
        }
        if existed && version > 0 {
            let check: String = conn
                .query_row("PRAGMA quick_check(1)", [], |r| r.get(0))
                .map_err(|e| StoreError::Open { path: path.clone(), message: format!("database is damaged: {e}") })?;
            if check != "ok" {
                return Err(StoreError::Open { path, message: format!("database is damaged: {check}") });
            }
        } else if existed && std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0) > 0 && version == 0 {
            let tables: i64 = conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0)).map_err(sql)?;
            if tables > 0 {
                return Err(StoreError::Open {
                    path,
                    message: "database holds tables but no polaris schema version".into(),
                });
            }
        }
        // Pragmas go outside transactions.
        if version == 0 {
            // Only possible before the first table exists.
            conn.execute_batch(&format!("PRAGMA page_size = {PAGE_SIZE}")).map_err(sql)?;
            conn.execute_batch("PRAGMA auto_vacuum = INCREMENTAL").map_err(sql)?;
        }
        let page_size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0)).map_err(sql)?;
        // The maintenance thread checkpoints the WAL in the background once it
        // is half the size of -s. Under a steady stream of commits such a
        // checkpoint never catches up with the end of the WAL, so once it holds
        // -s worth of frames the writer thread finishes the job itself, between
        // two commits (`finish_checkpoint`), with little left to copy, and the
        // WAL restarts. SQLite's own autocheckpoint is off: it would run inside
        // whichever commit crossed the mark, and commits may run on the event loop.
        let checkpoint_pages = (wal_size as i64 / page_size.max(512)).max(16);
        conn.execute_batch(&format!(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             PRAGMA wal_autocheckpoint = 0;
             PRAGMA journal_size_limit = {wal_size};
             PRAGMA temp_store = MEMORY;
             PRAGMA busy_timeout = 10000;
             PRAGMA cache_size = -8192;"
        ))
        .map_err(sql)?;
        if max_bytes > 0 {
            let pages = (max_bytes as i64 / page_size.max(512)).max(1);
            conn.query_row(&format!("PRAGMA max_page_count = {pages}"), [], |_| Ok(())).map_err(sql)?;
        }
        let mut store = Store {
            conn,
            path,
            _lock: lock,
            last_id_written: 0,
            meta_last_id: 0,
            maintainer: None,
            fail_while: std::env::var_os(FAIL_COMMITS_ENV).map(PathBuf::from),
            slow_commits: std::env::var(SLOW_COMMITS_ENV)
                .ok()
                .and_then(|ms| ms.parse().ok())
                .map(Duration::from_millis),
            sync_each_commit: fsync == FsyncPolicy::Always,
            wal_file: None,
            fail_syncs_while: std::env::var_os(FAIL_SYNCS_ENV).map(PathBuf::from),
            stats: StoreStats::default(),
            metrics: StoreMetrics::new(),
        };
        store.migrate(version)?;
        (store.meta_last_id, store.last_id_written) = store.read_last_id()?;
        let fsync_every = match fsync {
            FsyncPolicy::Interval(every) => Some(every),
            FsyncPolicy::Always | FsyncPolicy::Never => None,
        };
        preallocate_wal(&wal_path(&store.path), wal_size.min(WAL_WRITTEN_AHEAD_MAX));
        store.maintainer = Some(Maintainer::start(
            &store.path,
            fsync_every,
            WalShape { size: wal_size, checkpoint_pages, frame_bytes: page_size.max(512) as u64 + 24 },
            store.metrics.fsync_seconds.clone(),
        )?);
        Ok(store)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Counters for `stats`.
    pub fn stats(&self) -> polaris_engine::BinlogStats {
        self.stats.into()
    }

    /// Commit and fsync figures for `--metrics`.
    pub fn metrics(&self) -> &StoreMetrics {
        &self.metrics
    }

    /// The write-ahead log file next to [`Store::path`].
    pub fn wal_path(&self) -> PathBuf {
        wal_path(&self.path)
    }

    /// A row that cannot be read, named by table, row id and column, so that whoever
    /// repairs the file knows where to look.
    fn row_error(&self, table: &str, columns: &[&str], id: Option<i64>, e: rusqlite::Error) -> StoreError {
        use rusqlite::Error as E;
        let column = match &e {
            E::IntegralValueOutOfRange(i, _) | E::FromSqlConversionFailure(i, _, _) | E::InvalidColumnType(i, _, _) => {
                columns.get(*i).copied()
            }
            _ => None,
        };
        let row = id.map_or("a row".to_string(), |id| format!("the row with id {id}"));
        let column = column.map_or(String::new(), |c| format!(", column {c}"));
        StoreError::Open { path: self.path.clone(), message: format!("table {table}, {row}{column}: {e}") }
    }

    fn sql_err(&self) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        move |source| StoreError::Sqlite { path: self.path.clone(), source }
    }

    fn migrate(&mut self, from: i64) -> Result<(), StoreError> {
        for (i, step) in MIGRATIONS.iter().enumerate().skip(from as usize) {
            let tx =
                self.conn.transaction().map_err(|source| StoreError::Sqlite { path: self.path.clone(), source })?;
            tx.execute_batch(step).map_err(|source| StoreError::Sqlite { path: self.path.clone(), source })?;
            tx.execute_batch(&format!("PRAGMA user_version = {}", i + 1))
                .map_err(|source| StoreError::Sqlite { path: self.path.clone(), source })?;
            tx.commit().map_err(|source| StoreError::Sqlite { path: self.path.clone(), source })?;
            log::info!("{}: migrated schema to version {}", self.path.display(), i + 1);
        }
        Ok(())
    }

    /// The id in the `meta` row, and the highest id on disk (that, or a row's).
    fn read_last_id(&self) -> Result<(u64, u64), StoreError> {
        let meta: Option<i64> = self
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'last_id'", [], |r| r.get(0))
            .optional()
            .map_err(self.sql_err())?;
        let meta = meta.unwrap_or(0) as u64;
        let highest_row = highest_row_id(&self.conn).map_err(self.sql_err())?;
        Ok((meta, meta.max(highest_row)))
    }

    /// Loads every job, final state and tube setting into `engine` (whose clock
    /// reads `now`). Returns the number of jobs restored.
    pub fn load_into(&mut self, engine: &mut Engine, now: Nanos) -> Result<usize, StoreError> {
        let wall = wall_now();
        let mut restored = 0;
        {
            let mut stmt = self
                .conn
                .prepare(&format!("SELECT {} FROM jobs ORDER BY id", JOB_COLUMNS.join(", ")))
                .map_err(self.sql_err())?;
            let mut rows = stmt.query([]).map_err(self.sql_err())?;
            let mut tubes = HashMap::new();
            while let Some(row) = rows.next().map_err(self.sql_err())? {
                let rec = match job_from_row(row, wall, &mut tubes) {
                    Ok(Some(rec)) => rec,
                    Ok(None) => continue,
                    Err(e) => {
                        let id = row.get_ref(0).ok().and_then(|v| v.as_i64().ok());
                        return Err(self.row_error("jobs", JOB_COLUMNS, id, e));
                    }
                };
                engine.restore_job(rec, now);
                restored += 1;
            }
        }
        {
            let mut stmt =
                self.conn.prepare("SELECT id, state, at FROM tombstones ORDER BY at, id").map_err(self.sql_err())?;
            let mut rows = stmt.query([]).map_err(self.sql_err())?;
            while let Some(row) = rows.next().map_err(self.sql_err())? {
                let id: i64 = row.get(0).map_err(self.sql_err())?;
                let state: String = row.get(1).map_err(self.sql_err())?;
                let at: i64 = row.get(2).map_err(self.sql_err())?;
                let Some(state) = FinalState::from_name(&state) else { continue };
                // Map the wall-clock time onto the engine clock.
                let ago = nanos_until(at, wall);
                engine.restore_tombstone(Tombstone { id: JobId(id as u64), state, at: now.saturating_sub(ago) });
            }
        }
        {
            let mut stmt = self.conn.prepare("SELECT tube, ttl FROM tube_ttls").map_err(self.sql_err())?;
            let mut rows = stmt.query([]).map_err(self.sql_err())?;
            while let Some(row) = rows.next().map_err(self.sql_err())? {
                let tube: String = row.get(0).map_err(self.sql_err())?;
                let ttl: i64 = row.get(1).map_err(self.sql_err())?;
                if let Some(name) = TubeName::parse(tube.as_bytes()) {
                    engine.restore_tube_ttl(name, ttl.clamp(0, i64::from(u32::MAX)) as u32);
                }
            }
        }
        engine.reserve_ids_through(self.last_id_written);
        // Restoring changed nothing that needs writing back.
        let _ = engine.take_changes();
        Ok(restored)
    }

    /// Writes `batches`, in order, in one transaction, and returns how many rows it wrote
    /// or deleted. On failure nothing is written; the caller decides what to retry (see
    /// `pipeline.rs`). Batches with nothing to write cost nothing.
    pub fn commit_all(&mut self, batches: &[&Batch]) -> Result<u64, StoreError> {
        let last_id = batches.iter().map(|b| b.last_id).max().unwrap_or(self.last_id_written);
        if batches.iter().all(|b| b.is_empty()) && last_id <= self.last_id_written {
            return Ok(0);
        }
        if let Some(delay) = self.slow_commits {
            std::thread::sleep(delay);
        }
        let injected = injected_failure(self.fail_while.as_deref(), "failure", || self.path.clone());
        let started = std::time::Instant::now();
        match injected.map_or_else(|| self.write(batches, last_id), Err) {
            Ok((written, meta)) => {
                // SQLite holds the transaction now, whatever the fsync below says.
                self.meta_last_id = self.meta_last_id.max(meta);
                self.last_id_written = self.last_id_written.max(last_id);
                if self.sync_each_commit {
                    if let Err(e) = self.sync_wal() {
                        // The commit is in the WAL but maybe not on the disk: reported as
                        // failed, so the loop takes back its replies and commits again what
                        // is still true (the jobs it drops are deleted then).
                        self.metrics.commit_failures.inc();
                        return Err(e);
                    }
                }
                self.metrics.commit_seconds.observe(started.elapsed().as_secs_f64());
                self.metrics.commits.inc();
                self.stats.records_written += written;
                if let Some(maintainer) = &self.maintainer {
                    maintainer.mark_dirty();
                }
                Ok(written)
            }
            Err(e) => {
                self.metrics.commit_failures.inc();
                let _ = self.conn.execute_batch("ROLLBACK");
                Err(e)
            }
        }
    }

    /// fsyncs the WAL (`fdatasync`: the data and the size, not the timestamps).
    fn sync_wal(&mut self) -> Result<(), StoreError> {
        // The WAL's name is only needed to open it once, or to say which file failed.
        let db = &self.path;
        let io = |source| StoreError::Io { path: wal_path(db), source };
        if let Some(e) = injected_failure(self.fail_syncs_while.as_deref(), "fsync failure", || wal_path(db)) {
            return Err(e);
        }
        let started = std::time::Instant::now();
        let file = match &mut self.wal_file {
            Some(file) => file,
            slot => slot.insert(File::open(wal_path(db)).map_err(io)?),
        };
        file.sync_data().map_err(io)?;
        self.metrics.fsync_seconds.observe(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Writes `batches` and the id high-water mark `last_id` in one transaction; returns
    /// the rows written and the id now in the `meta` row.
    fn write(&mut self, batches: &[&Batch], last_id: u64) -> Result<(u64, u64), StoreError> {
        let path = self.path.clone();
        let sql = |source| StoreError::Sqlite { path: path.clone(), source };
        let tx = self.conn.unchecked_transaction().map_err(sql)?;
        let mut written = 0u64;
        let mut meta = self.meta_last_id;
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO jobs (id, tube, pri, delay_ns, ttr_ns, ttl_ns, ttl_at, state, ready_at, created_at,
                                       reserves, timeouts, releases, buries, kicks, body)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)
                     ON CONFLICT (id) DO UPDATE SET tube = excluded.tube, pri = excluded.pri,
                         delay_ns = excluded.delay_ns, ttr_ns = excluded.ttr_ns, ttl_ns = excluded.ttl_ns,
                         ttl_at = excluded.ttl_at, state = excluded.state, ready_at = excluded.ready_at,
                         reserves = excluded.reserves, timeouts = excluded.timeouts,
                         releases = excluded.releases, buries = excluded.buries, kicks = excluded.kicks",
                )
                .map_err(sql)?;
            // A job known before the batch has its row already (its insert was committed
            // first, batches being written in order); its body is never rewritten. A row
            // that is missing belonged to a job whose insert failed, and stays missing.
            let mut update = tx
                .prepare_cached(
                    "UPDATE jobs SET tube = ?2, pri = ?3, delay_ns = ?4, ttr_ns = ?5, ttl_ns = ?6, ttl_at = ?7,
                         state = ?8, ready_at = ?9, reserves = ?10, timeouts = ?11, releases = ?12,
                         buries = ?13, kicks = ?14
                     WHERE id = ?1",
                )
                .map_err(sql)?;
            let mut delete = tx.prepare_cached("DELETE FROM jobs WHERE id = ?1").map_err(sql)?;
            let mut put_tomb = tx
                .prepare_cached("INSERT OR REPLACE INTO tombstones (id, state, at) VALUES (?1, ?2, ?3)")
                .map_err(sql)?;
            let mut forget = tx.prepare_cached("DELETE FROM tombstones WHERE id = ?1").map_err(sql)?;
            for batch in batches {
                for job in &batch.jobs {
                    written += 1;
                    match job {
                        JobWrite::Delete(id) => {
                            delete.execute([id]).map_err(sql)?;
                        }
                        JobWrite::Insert(row, body) => {
                            let r = row;
                            insert
                                .execute(params![
                                    r.id,
                                    r.tube.as_str(),
                                    r.pri,
                                    r.delay_ns,
                                    r.ttr_ns,
                                    r.ttl_ns,
                                    r.ttl_at,
                                    r.state,
                                    r.ready_at,
                                    r.created_at,
                                    r.counters.reserves,
                                    r.counters.timeouts,
                                    r.counters.releases,
                                    r.counters.buries,
                                    r.counters.kicks,
                                    body
                                ])
                                .map_err(sql)?;
                        }
                        JobWrite::Update(r) => {
                            // `created_at` stays as the insert wrote it.
                            update
                                .execute(params![
                                    r.id,
                                    r.tube.as_str(),
                                    r.pri,
                                    r.delay_ns,
                                    r.ttr_ns,
                                    r.ttl_ns,
                                    r.ttl_at,
                                    r.state,
                                    r.ready_at,
                                    r.counters.reserves,
                                    r.counters.timeouts,
                                    r.counters.releases,
                                    r.counters.buries,
                                    r.counters.kicks
                                ])
                                .map_err(sql)?;
                        }
                    }
                }
                for (id, state, at) in &batch.tombstones {
                    put_tomb.execute(params![id, state, at]).map_err(sql)?;
                    written += 1;
                }
                for id in &batch.forgotten {
                    forget.execute([id]).map_err(sql)?;
                    written += 1;
                }
                for (tube, ttl) in &batch.tube_ttls {
                    if *ttl == 0 {
                        tx.prepare_cached("DELETE FROM tube_ttls WHERE tube = ?1")
                            .map_err(sql)?
                            .execute([tube.as_str()])
                            .map_err(sql)?;
                    } else {
                        tx.prepare_cached("INSERT OR REPLACE INTO tube_ttls (tube, ttl) VALUES (?1, ?2)")
                            .map_err(sql)?
                            .execute(params![tube.as_str(), ttl])
                            .map_err(sql)?;
                    }
                    written += 1;
                }
            }
            // Ids are never reused, across restarts too, so the highest one handed out must
            // be on disk. Usually a row shows it: the new job's, or the final state of one
            // that is gone. The `meta` row is rewritten only when none does (a job whose
            // commit failed, or rows removed since), which saves a page per commit: two
            // lookups of a table's last key cost less than writing one more WAL frame.
            if last_id > meta && highest_row_id(&tx).map_err(sql)? < last_id {
                tx.prepare_cached("UPDATE meta SET value = ?1 WHERE key = 'last_id'")
                    .map_err(sql)?
                    .execute([last_id as i64])
                    .map_err(sql)?;
                meta = last_id;
            }
        }
        tx.commit().map_err(sql)?;
        Ok((written, meta))
    }

    /// Whether the WAL holds `-s` worth of frames, so the next commit should run on the
    /// writer thread, which then checkpoints ([`Store::finish_checkpoint`]).
    pub fn wal_needs_checkpoint(&self) -> bool {
        self.maintainer.as_ref().is_some_and(|m| m.shared.wal_full.load(Ordering::Acquire))
    }

    /// Checkpoints the WAL on the store's own connection, with no commit running, so the
    /// checkpoint reaches the WAL's end and the next commit starts the log afresh.
    pub fn finish_checkpoint(&mut self) {
        let started = std::time::Instant::now();
        if let Err(e) = self.conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            log::warn!("{}: checkpoint failed: {e}", self.path.display());
        }
        self.metrics.checkpoint_seconds.observe(started.elapsed().as_secs_f64());
        if let Some(m) = &self.maintainer {
            m.shared.wal_full.store(false, Ordering::Release);
        }
    }

    /// Stops the maintenance thread after a last fsync (shutdown).
    pub fn sync(&mut self) -> Result<(), StoreError> {
        match self.maintainer.take() {
            Some(m) => m.stop(),
            None => Ok(()),
        }
    }
}

/// The error a fault injection flag stands for while its file exists (`FAIL_COMMITS_ENV`,
/// `FAIL_SYNCS_ENV`), as an I/O error on the file `path` names; `None` when unset or absent.
fn injected_failure(flag: Option<&Path>, what: &str, path: impl FnOnce() -> PathBuf) -> Option<StoreError> {
    let flag = flag.filter(|flag| flag.exists())?;
    let message = format!("injected {what}: {} exists", flag.display());
    Some(StoreError::Io { path: path(), source: std::io::Error::other(message) })
}

/// The highest id of a job or final-state row (0 if there is none).
fn highest_row_id(conn: &Connection) -> rusqlite::Result<u64> {
    let id: i64 = conn
        .prepare_cached(
            "SELECT max(coalesce((SELECT max(id) FROM jobs), 0), coalesce((SELECT max(id) FROM tombstones), 0))",
        )?
        .query_row([], |r| r.get(0))?;
    Ok(id as u64)
}

/// The WAL is written ahead with zeros up to `-s`, but at most this much.
const WAL_WRITTEN_AHEAD_MAX: u64 = 64 << 20;

/// Extends the WAL file with written zeros up to `size` bytes, as beanstalkd writes each
/// binlog file out to its full size when it creates it. SQLite ignores whatever follows
/// its last valid frame (zeros carry no salts) and reuses the file from its start after a
/// checkpoint, so the commits overwrite blocks the file system has already mapped, and
/// the fsync that makes one durable writes data only: an fsync after an append must also
/// commit the file's new size to the file system's journal (on the benchmark machine's
/// disk, `fdatasync` after writing one 1 KiB frame: p50 86 µs over written blocks, 116–134 µs
/// appending). Only bytes past the current end are written, so nothing SQLite wrote is
/// touched. It is only a
/// speed-up: where it fails (a disk without room for it) the file is cut back to where it
/// was and the store goes on without it.
fn preallocate_wal(wal: &Path, size: u64) {
    use std::os::unix::fs::FileExt;
    let file = match std::fs::OpenOptions::new().write(true).create(true).truncate(false).open(wal) {
        Ok(file) => file,
        Err(e) => return log::warn!("{}: not written ahead: {e}", wal.display()),
    };
    let start = match file.metadata() {
        Ok(m) if m.len() >= size => return,
        Ok(m) => m.len(),
        Err(e) => return log::warn!("{}: not written ahead: {e}", wal.display()),
    };
    let zeros = vec![0u8; 1 << 20];
    let mut at = start;
    let mut written = Ok(());
    while at < size && written.is_ok() {
        let n = (size - at).min(zeros.len() as u64);
        written = file.write_all_at(&zeros[..n as usize], at);
        at += n;
    }
    if let Err(e) = written.and_then(|()| file.sync_all()) {
        log::warn!("{}: not written ahead to {size} bytes ({e}); going on without", wal.display());
        if let Err(e) = file.set_len(start).and_then(|()| file.sync_all()) {
            log::warn!("{}: cutting it back to {start} bytes failed: {e}", wal.display());
        }
    }
}

/// How the maintenance thread measures the WAL.
struct WalShape {
    /// `-s`: past half of it, the WAL is checkpointed in the background.
    size: u64,
    /// Frames past which the writer finishes the checkpoint itself.
    checkpoint_pages: i64,
    /// Bytes of one frame (page and frame header).
    frame_bytes: u64,
}

impl WalShape {
    /// Bytes of the WAL in use: its frames as SQLite's index counts them (the file keeps
    /// its size, see [`preallocate_wal`]), or the file's length if the index cannot be
    /// read.
    fn used(&self, wal: &Path, shm: &Path) -> u64 {
        use std::os::unix::fs::FileExt;
        let mut header = [0u8; 96];
        let frames = File::open(shm)
            .and_then(|f| f.read_exact_at(&mut header, 0))
            .ok()
            .and_then(|()| crate::wal::frames_in_log(&header));
        match frames {
            Some(frames) => 32 + u64::from(frames) * self.frame_bytes,
            None => std::fs::metadata(wal).map(|m| m.len()).unwrap_or(0),
        }
    }
}

fn wal_path(db: &Path) -> PathBuf {
    beside(db, "-wal")
}

/// One of SQLite's files beside the database: its name with `suffix` added.
fn beside(db: &Path, suffix: &str) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// The store's background thread. Whatever touches the disk for long is done
/// here, off the event loop, so replies never wait for it:
/// - under `-f MS`, it fsyncs the WAL at most once per MS, after commits;
/// - when the WAL has grown past half of `-s`, it checkpoints it (PASSIVE:
///   writers go on appending meanwhile) through its own connection, so that the
///   checkpoint a commit runs at `-s` has little left to do.
struct Maintainer {
    shared: Arc<MaintainerShared>,
    thread: Option<std::thread::JoinHandle<Result<(), StoreError>>>,
}

struct MaintainerShared {
    dirty: AtomicBool,
    stop: AtomicBool,
    /// Counts commits, so the thread can tell when the store has gone idle.
    commits: std::sync::atomic::AtomicU64,
    /// The WAL held `-s` worth of frames at the last look: the writer should checkpoint.
    wal_full: AtomicBool,
}

/// After this long without a commit the store counts as idle: the WAL is
/// folded into the database and truncated, and free pages are given back.
const IDLE_AFTER: Duration = Duration::from_secs(1);

/// Gives free pages back to the file system, a little at a time, so the file
/// shrinks after a burst instead of staying at its peak size.
fn reclaim_free_pages(conn: &Connection, db: &Path) {
    let free: i64 = conn.query_row("PRAGMA freelist_count", [], |r| r.get(0)).unwrap_or(0);
    if free > 0 {
        if let Err(e) = conn.execute_batch("PRAGMA incremental_vacuum") {
            log::warn!("{}: incremental vacuum failed: {e}", db.display());
        }
    }
}

/// How often the thread looks at the WAL's size when nothing wakes it.
const CHECKPOINT_POLL: Duration = Duration::from_millis(100);

impl Maintainer {
    fn start(
        db: &Path,
        fsync_every: Option<Duration>,
        wal_shape: WalShape,
        fsync_seconds: prometheus::Histogram,
    ) -> Result<Maintainer, StoreError> {
        let conn = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX)
            .map_err(|source| StoreError::Sqlite { path: db.to_path_buf(), source })?;
        conn.execute_batch("PRAGMA busy_timeout = 10000")
            .map_err(|source| StoreError::Sqlite { path: db.to_path_buf(), source })?;
        let shared = Arc::new(MaintainerShared {
            dirty: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            commits: std::sync::atomic::AtomicU64::new(0),
            wal_full: AtomicBool::new(false),
        });
        let worker = Arc::clone(&shared);
        let (db, wal, shm) = (db.to_path_buf(), wal_path(db), beside(db, "-shm"));
        let wal_for_errors = wal.clone();
        let thread = std::thread::Builder::new()
            .name("polaris-store".into())
            .spawn(move || {
                let mut last_sync = std::time::Instant::now();
                // (commit count, when it last changed, whether that state was tidied)
                let mut idle = (0u64, std::time::Instant::now(), true);
                loop {
                    let stopping = worker.stop.load(Ordering::Acquire);
                    if let Some(every) = fsync_every {
                        if worker.dirty.load(Ordering::Acquire) && (stopping || last_sync.elapsed() >= every) {
                            worker.dirty.store(false, Ordering::Release);
                            last_sync = std::time::Instant::now();
                            let synced = fsync_file(&wal);
                            fsync_seconds.observe(last_sync.elapsed().as_secs_f64());
                            if let Err(e) = synced {
                                log::error!("periodic fsync failed: {e}");
                                if stopping {
                                    return Err(e);
                                }
                            }
                        }
                    }
                    if wal_shape.used(&wal, &shm) > wal_shape.size / 2 {
                        // (busy, frames in the log, frames checkpointed)
                        match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(1)) {
                            Ok(frames) if frames >= wal_shape.checkpoint_pages => {
                                worker.wal_full.store(true, Ordering::Release)
                            }
                            Ok(_) => {}
                            Err(e) => log::warn!("{}: checkpoint failed: {e}", db.display()),
                        }
                    }
                    let commits = worker.commits.load(Ordering::Acquire);
                    if commits != idle.0 {
                        idle = (commits, std::time::Instant::now(), false);
                    } else if !idle.2 && idle.1.elapsed() >= IDLE_AFTER {
                        // Idle: give back free pages, then fold the WAL into the
                        // database, so that the next commit starts it afresh (the file
                        // keeps its size: `preallocate_wal`).
                        idle.2 = true;
                        reclaim_free_pages(&conn, &db);
                        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(RESTART)", [], |_| Ok(())) {
                            log::warn!("{}: checkpoint failed: {e}", db.display());
                        }
                    }
                    if stopping {
                        return Ok(());
                    }
                    let nap = match fsync_every {
                        Some(every) if worker.dirty.load(Ordering::Acquire) => {
                            every.saturating_sub(last_sync.elapsed()).min(CHECKPOINT_POLL)
                        }
                        _ => CHECKPOINT_POLL,
                    };
                    std::thread::park_timeout(nap);
                }
            })
            .map_err(|source| StoreError::Io { path: wal_for_errors, source })?;
        Ok(Maintainer { shared, thread: Some(thread) })
    }

    fn mark_dirty(&self) {
        self.shared.commits.fetch_add(1, Ordering::AcqRel);
        if !self.shared.dirty.swap(true, Ordering::AcqRel) {
            if let Some(t) = &self.thread {
                t.thread().unpark();
            }
        }
    }

    /// Does a last fsync of what is pending and ends the thread.
    fn stop(mut self) -> Result<(), StoreError> {
        self.shared.stop.store(true, Ordering::Release);
        match self.thread.take() {
            Some(t) => {
                t.thread().unpark();
                t.join().unwrap_or(Ok(()))
            }
            None => Ok(()),
        }
    }
}

impl Drop for Maintainer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

fn fsync_file(path: &Path) -> Result<(), StoreError> {
    match File::open(path) {
        Ok(f) => f.sync_data().map_err(|source| StoreError::Io { path: path.to_path_buf(), source }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(StoreError::Io { path: path.to_path_buf(), source }),
    }
}

/// Reads one job row. `tubes` caches validated tube names: a million jobs
/// usually share a handful of tubes.
fn job_from_row(
    row: &rusqlite::Row<'_>,
    wall: i64,
    tubes: &mut HashMap<String, TubeName>,
) -> rusqlite::Result<Option<JobRecord<Box<[u8]>>>> {
    let id: i64 = row.get(0)?;
    let raw = row.get_ref(1)?.as_str()?;
    let tube = match tubes.get(raw) {
        Some(name) => name.clone(),
        None => {
            let Some(name) = TubeName::parse(raw.as_bytes()) else {
                log::warn!("skipping job {id}: invalid tube name {raw:?}");
                return Ok(None);
            };
            tubes.insert(raw.to_string(), name.clone());
            name
        }
    };
    let state = match row.get::<_, i64>(7)? {
        1 => JobState::Delayed,
        2 => JobState::Buried,
        _ => JobState::Ready,
    };
    let ready_at: i64 = row.get(8)?;
    let created_at: i64 = row.get(9)?;
    let ttl_at: Option<i64> = row.get(6)?;
    let delay_left = if state == JobState::Delayed { nanos_until(wall, ready_at) } else { 0 };
    let ttl_left = match state {
        JobState::Ready => ttl_at.map(|at| nanos_until(wall, at)),
        _ => None,
    };
    let body: Vec<u8> = row.get(15)?;
    Ok(Some(JobRecord {
        id: JobId(id as u64),
        tube,
        pri: row.get(2)?,
        delay_secs: secs_of(row.get(3)?),
        ttr_secs: secs_of(row.get(4)?),
        ttl: row.get::<_, Option<i64>>(5)?.map(|t| u64::try_from(t).unwrap_or(0)),
        ttl_left,
        state,
        delay_left,
        counters: JobCounters {
            reserves: row.get(10)?,
            timeouts: row.get(11)?,
            releases: row.get(12)?,
            buries: row.get(13)?,
            kicks: row.get(14)?,
        },
        age: nanos_until(created_at, wall),
        body: body.into_boxed_slice(),
    }))
}

/// A wall-clock instant `nanos` after `wall`. Clients control delays and TTLs (up to
/// 2^32-1 seconds each, whose sum passes `i64::MAX` nanoseconds since 1970), so the
/// arithmetic saturates: a deadline in the year 2262 is as good as one later.
fn wall_after(wall: i64, nanos: u64) -> i64 {
    wall.saturating_add(nanos_column(nanos))
}

/// Nanoseconds from `from` until `to`, 0 if `to` is not later; rows may hold any value.
fn nanos_until(from: i64, to: i64) -> u64 {
    u64::try_from(to.saturating_sub(from)).unwrap_or(0)
}

/// A nanosecond duration as an SQLite integer, saturating at `i64::MAX`.
fn nanos_column(nanos: u64) -> i64 {
    i64::try_from(nanos).unwrap_or(i64::MAX)
}

/// A nanosecond column as whole seconds (the schema keeps nanoseconds).
fn secs_of(nanos: i64) -> u32 {
    u32::try_from(nanos.max(0) as u64 / polaris_engine::SECOND).unwrap_or(u32::MAX)
}

/// Takes an exclusive lock on `dir`, so two servers never share a database.
fn lock_dir(dir: &Path) -> Result<File, StoreError> {
    let path = dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| StoreError::Io { path: path.clone(), source })?;
    if crate::sys::try_lock_exclusive(&file).is_err() {
        return Err(StoreError::Open { path, message: "another polarisd is using this directory".into() });
    }
    Ok(file)
}
