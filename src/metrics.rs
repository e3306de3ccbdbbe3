//! `--metrics ADDR`: Prometheus metrics, served from a thread of their own.
//!
//! The event loop never waits for a scrape. A scrape sets [`Exchange::requested`] and
//! wakes the loop (a `mio::Waker`); at the end of its turn the loop takes a
//! [`MetricsSnapshot`] of the engine (linear in the tubes, only when asked) and publishes
//! it with `try_lock`: if the metrics thread happens to hold the lock, the loop keeps
//! going and publishes a moment later. The metrics thread waits up to
//! [`SNAPSHOT_WAIT`] for the fresh snapshot (else it shows the last one, and
//! `polarisd_metrics_snapshot_age_seconds` says how old it is), then renders it. The
//! store's commit and fsync histograms are prometheus types recorded where the work
//! happens (lock-free); file sizes and the uptime are read by the metrics thread itself.

use crate::store::StoreMetrics;
use polaris_engine::{Engine, MetricsSnapshot, TubeJobs};
use prometheus::{Gauge, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, TryLockError};
use std::time::{Duration, Instant};

/// `--metrics` and its companion flag.
#[derive(Clone, Debug)]
pub struct MetricsConfig {
    /// Where to serve `/metrics` (`HOST:PORT`).
    pub listen: String,
    /// Tubes shown by name in `polarisd_jobs`; the rest are added up under
    /// [`OTHER_TUBES`].
    pub top_tubes: usize,
}

/// The `tube` label of the tubes beyond the top N, added up. `*` is not a tube-name
/// character, so no real tube can have this name.
pub const OTHER_TUBES: &str = "*other*";
/// How long a scrape waits for the loop's fresh snapshot before showing the last one.
pub const SNAPSHOT_WAIT: Duration = Duration::from_secs(1);
/// How soon the loop tries again to publish when the metrics thread held the lock.
pub const PUBLISH_RETRY: Duration = Duration::from_millis(1);

/// The last snapshot the loop published.
#[derive(Default)]
struct Published {
    /// Counts publications, so a scrape can tell a fresh one from the one it saw.
    seq: u64,
    snapshot: Option<(MetricsSnapshot, Instant)>,
}

/// What the event loop and the metrics thread share.
struct Exchange {
    /// A scrape waits for a snapshot.
    requested: AtomicBool,
    latest: Mutex<Published>,
    fresh: Condvar,
    waker: std::sync::Arc<mio::Waker>,
}

/// The loop's side: owned by the server.
pub struct Metrics {
    exchange: Arc<Exchange>,
    top_tubes: usize,
    /// The last publish found the lock taken: try again soon.
    retry: bool,
    local_addr: std::net::SocketAddr,
}

/// A bound `--metrics` socket, before the store (whose figures it shows) is open.
pub struct BoundMetrics {
    listener: polaris_metrics::BoundListener,
    config: MetricsConfig,
}

/// Binds `--metrics ADDR`; a bad or busy address fails the start, naming it.
pub fn bind(config: &MetricsConfig) -> anyhow::Result<BoundMetrics> {
    Ok(BoundMetrics { listener: polaris_metrics::bind(&config.listen)?, config: config.clone() })
}

/// The store's side of the metrics: its figures and its files.
pub struct StoreView {
    /// Commit and fsync figures.
    pub metrics: StoreMetrics,
    /// The database file.
    pub db: PathBuf,
    /// Its write-ahead log.
    pub wal: PathBuf,
}

impl BoundMetrics {
    /// Starts answering scrapes; `waker` wakes the event loop for a snapshot, `started` is
    /// when the server started (the uptime counts from there, restoring the store included).
    pub fn start(
        self,
        waker: std::sync::Arc<mio::Waker>,
        store: Option<StoreView>,
        started: Instant,
    ) -> anyhow::Result<Metrics> {
        let exchange = Arc::new(Exchange {
            requested: AtomicBool::new(false),
            latest: Mutex::new(Published::default()),
            fresh: Condvar::new(),
            waker,
        });
        let families = Families::new(store, started)?;
        let shared = Arc::clone(&exchange);
        let server = self.listener.serve(move || {
            let snapshot = fresh_snapshot(&shared);
            families.update(snapshot.as_ref());
            polaris_metrics::render(&families.registry)
        })?;
        log::info!("metrics on http://{}/metrics", server.local_addr());
        Ok(Metrics { exchange, top_tubes: self.config.top_tubes, retry: false, local_addr: server.local_addr() })
    }
}

/// Asks the loop for a snapshot and waits (at most [`SNAPSHOT_WAIT`]) for it.
fn fresh_snapshot(exchange: &Exchange) -> Option<(MetricsSnapshot, Instant)> {
    let seen = exchange.latest.lock().unwrap_or_else(|p| p.into_inner()).seq;
    exchange.requested.store(true, Ordering::Release);
    if let Err(e) = exchange.waker.wake() {
        log::warn!("cannot wake the event loop for a metrics snapshot: {e}");
    }
    let latest = exchange.latest.lock().unwrap_or_else(|p| p.into_inner());
    let (latest, _) =
        exchange.fresh.wait_timeout_while(latest, SNAPSHOT_WAIT, |p| p.seq == seen).unwrap_or_else(|p| p.into_inner());
    latest.snapshot.clone()
}

impl Metrics {
    /// The address `/metrics` is served on.
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.local_addr
    }

    /// Whether the loop should come back soon to publish (see [`PUBLISH_RETRY`]).
    pub fn wants_retry(&self) -> bool {
        self.retry
    }

    /// At the end of a loop turn: publishes a snapshot if a scrape asked for one. Never
    /// blocks: if the metrics thread holds the lock, it tries again next turn.
    pub fn publish_if_asked(&mut self, engine: &Engine) {
        if !self.exchange.requested.swap(false, Ordering::AcqRel) {
            self.retry = false;
            return;
        }
        let snapshot = engine.metrics_snapshot(self.top_tubes);
        let mut latest = match self.exchange.latest.try_lock() {
            Ok(latest) => latest,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => {
                self.exchange.requested.store(true, Ordering::Release);
                self.retry = true;
                return;
            }
        };
        latest.seq += 1;
        latest.snapshot = Some((snapshot, Instant::now()));
        drop(latest);
        self.exchange.fresh.notify_all();
        self.retry = false;
    }
}

/// The metric families, owned by the metrics thread, set from each snapshot.
struct Families {
    registry: Registry,
    started: Instant,
    jobs: IntGaugeVec,
    urgent: IntGaugeVec,
    tubes: IntGauge,
    tubes_folded: IntGauge,
    commands: IntCounterVec,
    connections: IntGauge,
    connections_total: IntCounter,
    producers: IntGauge,
    workers: IntGauge,
    waiting: IntGauge,
    jobs_created: IntCounter,
    job_timeouts: IntCounter,
    jobs_expired: IntCounter,
    jobs_revoked: IntCounter,
    job_bytes: IntGauge,
    max_job_bytes: IntGauge,
    tombstones: IntGauge,
    draining: IntGauge,
    uptime: Gauge,
    snapshot_age: Gauge,
    store_bytes: IntGaugeVec,
    store_files: Option<(PathBuf, PathBuf)>,
}

impl Families {
    fn new(store: Option<StoreView>, started: Instant) -> anyhow::Result<Families> {
        let registry = Registry::new();
        fn registered<T: prometheus::core::Collector + Clone + 'static>(
            registry: &Registry,
            metric: T,
        ) -> prometheus::Result<T> {
            registry.register(Box::new(metric.clone()))?;
            Ok(metric)
        }
        let gauge = |name: &str, help: &str| registered(&registry, IntGauge::new(name, help)?);
        let counter = |name: &str, help: &str| registered(&registry, IntCounter::new(name, help)?);
        let build = registered(
            &registry,
            IntGaugeVec::new(Opts::new("polarisd_build_info", "Always 1; the version is a label."), &["version"])?,
        )?;
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let store_files = store.as_ref().map(|s| (s.db.clone(), s.wal.clone()));
        if let Some(store) = store {
            let m = store.metrics;
            registered(&registry, m.commits)?;
            registered(&registry, m.commit_failures)?;
            registered(&registry, m.commit_seconds)?;
            registered(&registry, m.fsync_seconds)?;
            registered(&registry, m.checkpoint_seconds)?;
        }
        Ok(Families {
            jobs: registered(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "polarisd_jobs",
                        "Jobs by tube and state (ready, reserved, delayed, buried); the tubes beyond the top N (--metrics-top-tubes) are added up under tube=\"*other*\".",
                    ),
                    &["tube", "state"],
                )?,
            )?,
            urgent: registered(
                &registry,
                IntGaugeVec::new(
                    Opts::new("polarisd_jobs_urgent", "Ready jobs with priority below 1024, by tube (as polarisd_jobs)."),
                    &["tube"],
                )?,
            )?,
            tubes: gauge("polarisd_tubes", "Tubes that exist.")?,
            tubes_folded: gauge("polarisd_tubes_folded", "Tubes added up under tube=\"*other*\".")?,
            commands: registered(
                &registry,
                IntCounterVec::new(
                    Opts::new("polarisd_commands_total", "Beanstalk commands run, by command (stats' cmd-*)."),
                    &["command"],
                )?,
            )?,
            connections: gauge("polarisd_connections", "Open client connections.")?,
            connections_total: counter("polarisd_connections_total", "Client connections accepted.")?,
            producers: gauge("polarisd_producers", "Open connections that have put a job.")?,
            workers: gauge("polarisd_workers", "Open connections that have reserved a job.")?,
            waiting: gauge("polarisd_waiting_connections", "Connections waiting in a reserve.")?,
            jobs_created: counter("polarisd_jobs_created_total", "Jobs put.")?,
            job_timeouts: counter("polarisd_job_timeouts_total", "Reservations that ran out of their TTR.")?,
            jobs_expired: counter("polarisd_jobs_expired_total", "Jobs that ran out of their TTL (extension).")?,
            jobs_revoked: counter("polarisd_jobs_revoked_total", "Jobs revoked (extension).")?,
            job_bytes: gauge("polarisd_job_bytes", "Bytes of job bodies held.")?,
            max_job_bytes: gauge("polarisd_max_job_bytes", "The --max-job-bytes bound.")?,
            tombstones: gauge("polarisd_tombstones", "Final job states kept (--retention, --max-tombstones).")?,
            draining: gauge("polarisd_draining", "1 in drain mode (after SIGUSR1), else 0.")?,
            uptime: registered(&registry, Gauge::new("polarisd_uptime_seconds", "Seconds since the server started.")?)?,
            snapshot_age: registered(
                &registry,
                Gauge::new(
                    "polarisd_metrics_snapshot_age_seconds",
                    "Age of the queue snapshot shown; more than a second means the event loop was too busy to answer the scrape.",
                )?,
            )?,
            store_bytes: registered(
                &registry,
                IntGaugeVec::new(
                    Opts::new("polarisd_store_bytes", "Size of the store's files (-b), by file: db or wal."),
                    &["file"],
                )?,
            )?,
            store_files,
            started,
            registry,
        })
    }

    fn update(&self, snapshot: Option<&(MetricsSnapshot, Instant)>) {
        self.uptime.set(self.started.elapsed().as_secs_f64());
        if let Some((db, wal)) = &self.store_files {
            for (file, path) in [("db", db), ("wal", wal)] {
                let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
                self.store_bytes.with_label_values(&[file]).set(i64::try_from(len).unwrap_or(i64::MAX));
            }
        }
        let Some((s, taken)) = snapshot else { return };
        self.snapshot_age.set(taken.elapsed().as_secs_f64());
        // Tubes come and go: only this snapshot's are shown.
        self.jobs.reset();
        self.urgent.reset();
        let folded = (s.other_tube_count > 0).then_some(&s.other_tubes);
        for (name, tube) in s.top_tubes.iter().map(|t| (t.name.as_str(), t)).chain(folded.map(|t| (OTHER_TUBES, t))) {
            self.set_tube(name, tube);
        }
        let gauge = |g: &IntGauge, v: u64| g.set(i64::try_from(v).unwrap_or(i64::MAX));
        // The engine's counters only grow; the registry's follow them.
        let counter = |c: &IntCounter, v: u64| c.inc_by(v.saturating_sub(c.get()));
        gauge(&self.tubes, s.tubes);
        gauge(&self.tubes_folded, s.other_tube_count);
        for (name, n) in &s.commands {
            counter(&self.commands.with_label_values(&[name]), *n);
        }
        gauge(&self.connections, s.connections);
        counter(&self.connections_total, s.total_connections);
        gauge(&self.producers, s.producers);
        gauge(&self.workers, s.workers);
        gauge(&self.waiting, s.waiting);
        counter(&self.jobs_created, s.total_jobs);
        counter(&self.job_timeouts, s.job_timeouts);
        counter(&self.jobs_expired, s.jobs_expired);
        counter(&self.jobs_revoked, s.jobs_revoked);
        gauge(&self.job_bytes, s.job_bytes);
        gauge(&self.max_job_bytes, s.max_job_bytes);
        gauge(&self.tombstones, s.tombstones);
        gauge(&self.draining, u64::from(s.draining));
    }

    fn set_tube(&self, name: &str, tube: &TubeJobs) {
        for (state, n) in
            [("ready", tube.ready), ("reserved", tube.reserved), ("delayed", tube.delayed), ("buried", tube.buried)]
        {
            self.jobs.with_label_values(&[name, state]).set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        self.urgent.with_label_values(&[name]).set(i64::try_from(tube.urgent).unwrap_or(i64::MAX));
    }
}
