//! `polaris-dispatch`: the REST/JSON dispatcher.
//!
//! A `POST /v1/jobs` call is stored in the database (SQLite, or PostgreSQL; see [`db`]) first
//! (job and full host list); then an
//! enqueuer thread puts one signed envelope per known host on `host.<id>`, a consumer thread
//! records the agents' results from the reply tube and wakes the HTTP handlers waiting for a
//! sync job, and the same enqueuer thread expires host jobs whose deadline passed. All
//! blocking work (the database, the beanstalk client) runs on those threads or in
//! `spawn_blocking`, never on the async runtime's workers.
//!
//! See `docs/DISPATCH.md` for the API, the error codes and the security model.
//!
//! # Layout
//! - this file: the configuration, the queue connection pool, the sync-job waiters and
//!   [`run`], which starts the threads and serves the API.
//! - [`api`]: the REST API (axum): `/v1/jobs` and `/v1/hosts`.
//! - [`request`]: validation of request bodies, field by field.
//! - [`policy`]: a job's execution policy (start time, TTL, retries, batches or a
//!   concurrency cap with a failure threshold, resource limits), parsed and stored.
//! - [`rollout`]: which held-back hosts start now and what a finished attempt leads to.
//! - [`events`]: `GET /v1/jobs/{id}/events`, a job as a resumable Server-Sent Events stream.
//! - [`error`]: the API's error reply (HTTP status, JSON body naming code and field).
//! - [`auth`]: optional bearer tokens with a per-token command allow-list.
//! - [`metrics`]: `GET /metrics` (Prometheus): requests by route template and status,
//!   host jobs by state, fan-out and completion latencies, the queue connection.
//! - [`fleet`]: the product tree (products, services, components) and the hosts placed in
//!   it: nodes, placements, labels, targets, bulk import, the change log, and their routes.
//! - [`store`]: the database (`hosts`, `jobs`, `host_job`), written before anything
//!   is queued or answered.
//! - [`db`]: the database layer: one interface, SQLite and PostgreSQL behind it, each with
//!   its own migrations.
//! - [`shard`]: queue shards: several polarisd, each host on one by rendezvous hashing,
//!   and which of them answer.
//! - `worker` (private): the blocking threads: the enqueuer (puts and expires host jobs,
//!   moves the work of dead shards) and a results consumer per shard.

#![deny(unsafe_code)]

pub mod api;
pub mod auth;
pub mod console;
pub mod db;
pub mod error;
pub mod events;
pub mod fleet;
pub mod metrics;
pub mod policy;
pub mod request;
pub mod rollout;
pub mod shard;
pub mod store;
mod worker;

use crate::auth::Tokens;
use crate::store::Store;
use anyhow::Context as _;
use polaris_ops_wire::wire::{self, Secret};
use polaris_proto::client::{self, Client, Endpoint, TlsClientFiles};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

/// Default of [`DispatchConfig::shard_grace`], in seconds: longer than a polarisd restart,
/// short enough that a dead shard's hosts get work again within a minute.
pub const DEFAULT_SHARD_GRACE_SECS: u64 = 30;

/// Everything `polaris-dispatch` is configured with.
#[derive(Debug, Clone)]
pub struct DispatchConfig {
    /// HTTP listen address, e.g. `127.0.0.1:8080` (port 0 picks a free one).
    pub listen: String,
    /// Queue address, e.g. `127.0.0.1:11300`; several, comma-separated, are queue shards
    /// ([`shard`]), each written as the agents reach it (they are told theirs).
    pub queue: String,
    /// TLS to the queue (`--queue-ca` and the rest); `None` is plain TCP.
    pub queue_tls: Option<TlsClientFiles>,
    /// The database: SQLite in a directory (the default), or PostgreSQL.
    pub database: store::DatabaseLocation,
    /// File holding the shared envelope secret; `None` reads env `POLARIS_SECRET`.
    pub secret_file: Option<PathBuf>,
    /// JSON tokens file; `None` turns authentication off.
    pub tokens_file: Option<PathBuf>,
    /// Tube the agents put their results on.
    pub reply_tube: String,
    /// How long a sync call waits for answers past the job's timeout plus `kill_grace`.
    pub sync_grace: Duration,
    /// SIGTERM → SIGKILL delay put in every envelope; agents use at most this, and every
    /// wait for a result (sync calls, reserved host jobs, TTR) is sized for it.
    pub kill_grace: Duration,
    /// How long past its start deadline plus timeout a taken job may still answer before
    /// it is marked expired.
    pub result_grace: Duration,
    /// Client networks allowed to call the API; empty allows every client.
    pub allowed_clients: Vec<ipnet::IpNet>,
    /// Serve `GET /metrics` without a token even when tokens are on
    /// (`--metrics-without-token`); `--allow-client` still applies.
    pub metrics_without_token: bool,
    /// How many lines of agents' watched logs are kept, and for how long
    /// (`--log-retention-lines`, `--log-retention-age`).
    pub log_retention: store::LogRetention,
    /// How long a lease on the background work lasts unless renewed (`--lease-secs`): how
    /// soon another dispatcher on the same PostgreSQL database takes over from one that died.
    pub lease_ttl: Duration,
    /// How long a queue shard may be unreachable before its hosts, and their work not yet
    /// taken, move to the other shards (`--shard-grace`).
    pub shard_grace: Duration,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        DispatchConfig {
            listen: "127.0.0.1:8080".into(),
            queue: "127.0.0.1:11300".into(),
            queue_tls: None,
            database: store::DatabaseLocation::SqliteDir(PathBuf::from("polaris-dispatch-data")),
            secret_file: None,
            tokens_file: None,
            reply_tube: wire::DEFAULT_REPLY_TUBE.into(),
            sync_grace: Duration::from_secs(5),
            kill_grace: Duration::from_secs(5),
            result_grace: Duration::from_secs(30),
            allowed_clients: Vec::new(),
            metrics_without_token: false,
            log_retention: store::LogRetention::default(),
            lease_ttl: Duration::from_secs(10),
            shard_grace: Duration::from_secs(DEFAULT_SHARD_GRACE_SECS),
        }
    }
}

/// A few idle queue connections shared by HTTP handlers and the enqueuer. A connection
/// that saw an I/O or protocol error is dropped rather than returned, and with it every
/// idle one (they most likely lead to the same dead server).
#[derive(Debug)]
pub struct QueuePool {
    endpoint: Endpoint,
    idle: Mutex<Vec<PooledConn>>,
    /// Whether the queue speaks the polarisd extensions, as the last new
    /// connection found out (0 unknown, 1 no, 2 yes).
    extensions: std::sync::atomic::AtomicU8,
}

/// What a connection learnt about the queue server it reached, when it connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueInfo {
    /// Which server process this is: `stats`' random `id` (beanstalkd 1.12 and polarisd
    /// draw a new one at every start), else its `pid`. Queue job ids are
    /// only meaningful to the instance that issued them: an in-memory queue that restarts
    /// hands the same ids to new jobs.
    pub instance: String,
    /// Whether it speaks the polarisd extensions (job TTLs, `job-state`).
    pub extensions: bool,
}

#[derive(Debug)]
struct PooledConn {
    client: Client,
    info: QueueInfo,
}

/// Idle connections kept for reuse.
const MAX_IDLE_QUEUE_CONNECTIONS: usize = 4;

impl QueuePool {
    /// A pool for the queue at `endpoint`; connects lazily.
    pub fn new(endpoint: Endpoint) -> QueuePool {
        QueuePool { endpoint, idle: Mutex::new(Vec::new()), extensions: std::sync::atomic::AtomicU8::new(0) }
    }

    /// Where it connects.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Whether the queue is a polarisd (job TTLs, `job-state`), rather than a
    /// plain beanstalkd. Asked again on every new connection, so a queue
    /// replaced by the other kind is noticed.
    pub fn has_extensions(&self) -> bool {
        use std::sync::atomic::Ordering;
        if self.extensions.load(Ordering::Relaxed) == 0 {
            let _ = self.with(|_| Ok(()));
        }
        self.extensions.load(Ordering::Relaxed) == 2
    }

    /// Runs `f` on a pooled connection (blocking).
    pub fn with<T>(&self, f: impl FnOnce(&mut Client) -> client::Result<T>) -> client::Result<T> {
        self.with_conn(|client, _| f(client))
    }

    /// Runs `f` on a pooled connection, telling it which queue instance the connection
    /// reached: everything `f` does on that connection happens on that instance.
    pub fn with_conn<T>(&self, f: impl FnOnce(&mut Client, &QueueInfo) -> client::Result<T>) -> client::Result<T> {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut conn = match idle {
            Some(conn) => conn,
            None => self.connect()?,
        };
        let result = f(&mut conn.client, &conn.info);
        let broken = result.as_ref().is_err_and(shard::is_unreachable);
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if broken {
            idle.clear();
        } else if idle.len() < MAX_IDLE_QUEUE_CONNECTIONS {
            idle.push(conn);
        }
        result
    }

    fn connect(&self) -> client::Result<PooledConn> {
        let mut client = self.endpoint.connect(Duration::from_secs(2))?;
        let extensions = client.supports_extensions()?;
        self.extensions.store(if extensions { 2 } else { 1 }, std::sync::atomic::Ordering::Relaxed);
        let stats = client.stats()?;
        // Older servers without `id`: the pid (a start time computed from `uptime` would
        // wobble by a second between connections).
        let instance = match stats.get("id").filter(|id| !id.is_empty()) {
            Some(id) => format!("id {id}"),
            None => format!("pid {}", stats.get("pid").unwrap_or("?")),
        };
        Ok(PooledConn { client, info: QueueInfo { instance, extensions } })
    }
}

/// Sync HTTP calls waiting for their job's results, woken whenever a host of the job gets
/// its final answer.
#[derive(Debug, Default)]
pub struct Waiters {
    by_job: Mutex<HashMap<String, Arc<Notify>>>,
}

impl Waiters {
    /// The notifier for `job_id`, created if needed.
    pub fn register(&self, job_id: &str) -> Arc<Notify> {
        let mut map = self.by_job.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(job_id.to_string()).or_default().clone()
    }

    /// Forgets `job_id`'s notifier.
    pub fn unregister(&self, job_id: &str) {
        self.by_job.lock().unwrap_or_else(|p| p.into_inner()).remove(job_id);
    }

    /// Wakes everyone waiting on `job_id`.
    pub fn notify(&self, job_id: &str) {
        if let Some(notify) = self.by_job.lock().unwrap_or_else(|p| p.into_inner()).get(job_id) {
            notify.notify_waiters();
        }
    }
}

/// The state shared by the HTTP handlers and the worker threads.
#[derive(Debug)]
pub struct Dispatcher {
    /// The database.
    pub store: Store,
    /// The queue shards (one when `--queue` names one server), with connections for puts,
    /// deletes and job lookups.
    pub queues: shard::Shards,
    /// The envelope secret.
    pub secret: Secret,
    /// Bearer tokens, when authentication is on.
    pub tokens: Option<Tokens>,
    /// The reply tube named in envelopes.
    pub reply_tube: String,
    /// Sync calls waiting for answers.
    pub waiters: Waiters,
    /// See [`DispatchConfig::sync_grace`].
    pub sync_grace: Duration,
    /// See [`DispatchConfig::kill_grace`].
    pub kill_grace: Duration,
    /// See [`DispatchConfig::result_grace`].
    pub result_grace: Duration,
    /// See [`DispatchConfig::allowed_clients`].
    pub allowed_clients: Vec<ipnet::IpNet>,
    /// Counts cancellations, so the enqueuer asks the database whether a job was cancelled
    /// only when one happened since it last asked.
    pub cancellations: std::sync::atomic::AtomicU64,
    /// `GET /metrics`.
    pub metrics: metrics::DispatchMetrics,
    /// See [`DispatchConfig::metrics_without_token`].
    pub metrics_without_token: bool,
    /// See [`DispatchConfig::log_retention`].
    pub log_retention: store::LogRetention,
    /// This process among the dispatchers sharing a database: the holder name of its
    /// leases (see [`Store::hold_lease`]).
    pub instance_id: String,
    /// See [`DispatchConfig::lease_ttl`].
    pub lease_ttl: Duration,
    wake_enqueuer: mpsc::SyncSender<()>,
}

impl Dispatcher {
    /// Some host jobs of `job_id` changed state: wakes the sync calls waiting for it, and
    /// observes its completion once every host is final (blocking: reads the database).
    pub fn host_jobs_changed(&self, job_id: &str) {
        self.waiters.notify(job_id);
        if let Err(e) = self.metrics.host_job_final(&self.store, job_id) {
            log::warn!("job {job_id}: cannot check its completion for the metrics: {e}");
        }
    }

    /// Asks the enqueuer thread to look for pending host jobs now rather than at its next tick.
    pub fn wake_enqueuer(&self) {
        // A full channel means a wake-up is already queued; that one will do.
        let _ = self.wake_enqueuer.try_send(());
    }
}

/// Runs the dispatcher until SIGTERM or SIGINT. Prints `listening on ADDR` as the first
/// line on stdout once the HTTP socket is bound.
pub fn run(config: DispatchConfig) -> anyhow::Result<()> {
    let secret = Secret::load(config.secret_file.as_deref())?;
    let tokens = match &config.tokens_file {
        Some(path) => Some(Tokens::load(path)?),
        None => None,
    };
    let endpoints = config
        .queue
        .split(',')
        .map(str::trim)
        .filter(|addr| !addr.is_empty())
        .map(|addr| Endpoint::from_flags(addr, config.queue_tls.as_ref()))
        .collect::<Result<Vec<_>, _>>()?;
    let queues = shard::Shards::new(endpoints, config.shard_grace).context("--queue")?;
    let store =
        Store::open_at(&config.database).with_context(|| format!("opening the database {}", config.database))?;
    if !client::is_valid_tube_name(&config.reply_tube) {
        anyhow::bail!("--reply-tube {:?} is not a valid tube name", config.reply_tube);
    }
    let (wake_tx, wake_rx) = mpsc::sync_channel(1);
    let dispatcher = Arc::new(Dispatcher {
        store,
        queues,
        secret,
        tokens,
        reply_tube: config.reply_tube.clone(),
        waiters: Waiters::default(),
        sync_grace: config.sync_grace,
        kill_grace: config.kill_grace,
        result_grace: config.result_grace,
        allowed_clients: config.allowed_clients.clone(),
        cancellations: std::sync::atomic::AtomicU64::new(0),
        metrics: metrics::DispatchMetrics::new(),
        metrics_without_token: config.metrics_without_token,
        log_retention: config.log_retention,
        instance_id: format!("{}-{}", std::process::id(), uuid::Uuid::new_v4().simple()),
        lease_ttl: config.lease_ttl,
        wake_enqueuer: wake_tx,
    });
    log::info!("dispatcher instance {} on {}", dispatcher.instance_id, config.database);
    let stop = Arc::new(AtomicBool::new(false));
    let threads = worker::spawn(&dispatcher, &config.database, wake_rx, &stop)?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let served = runtime.block_on(api::serve(dispatcher.clone(), &config.listen));

    stop.store(true, Ordering::SeqCst);
    dispatcher.wake_enqueuer();
    for thread in threads {
        if thread.join().is_err() {
            log::error!("a worker thread panicked");
        }
    }
    worker::release_leases(&dispatcher);
    served
}
