//! `GET /metrics`: the dispatcher's Prometheus metrics.
//!
//! - HTTP requests by method, matched route template (never the raw path, so ids do not
//!   make new series; requests no route matched are `route="unmatched"`) and status, and
//!   their durations;
//! - host jobs by state, from the database: the open states on every scrape (an index
//!   counts them), the final ones from a count at most [`FINAL_COUNTS_MAX_AGE`] old (that
//!   count reads the whole table);
//! - fan-out (job stored → every envelope put) and completion (job stored → every host
//!   final) latencies;
//! - the queue connection of each worker thread: up or down, and reconnections.
//!
//! Who may scrape: `--allow-client` applies as to every route; with `--tokens`, any valid
//! token may (a token with `"methods": []` and nothing else is a scrape-only token),
//! unless `--metrics-without-token` opens `/metrics` to every allowed client.

use crate::store::{HostState, Store, StoreError};
use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};
use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How old the count of final host jobs shown may be.
pub const FINAL_COUNTS_MAX_AGE: Duration = Duration::from_secs(60);
/// Jobs remembered as already observed, so a job's fan-out or completion is observed once
/// even when two threads see it complete.
const REMEMBERED_JOBS: usize = 4096;

/// The HTTP methods shown by name; any other is `method="other"`.
const KNOWN_METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

/// The worker threads whose queue connection is shown.
#[derive(Clone, Copy, Debug)]
pub enum QueueUser {
    /// The enqueuer (puts envelopes, expires host jobs).
    Enqueuer,
    /// The results consumer.
    Results,
}

impl QueueUser {
    fn label(self) -> &'static str {
        match self {
            QueueUser::Enqueuer => "enqueuer",
            QueueUser::Results => "results",
        }
    }
}

/// Job ids recently observed, oldest first.
#[derive(Debug, Default)]
struct Remembered(VecDeque<String>);

impl Remembered {
    /// True the first time `id` is offered (within the last [`REMEMBERED_JOBS`]).
    fn first_time(&mut self, id: &str) -> bool {
        if self.0.iter().any(|seen| seen == id) {
            return false;
        }
        if self.0.len() == REMEMBERED_JOBS {
            self.0.pop_front();
        }
        self.0.push_back(id.to_string());
        true
    }
}

/// The dispatcher's metric families.
#[derive(Debug)]
pub struct DispatchMetrics {
    registry: Registry,
    http_requests: IntCounterVec,
    http_seconds: HistogramVec,
    host_jobs: IntGaugeVec,
    fanout: Histogram,
    completion: Histogram,
    queue_connected: IntGaugeVec,
    queue_reconnects: IntCounterVec,
    /// Per queue shard: 1 while it answers, 0 while it does not, -1 once dead (its hosts moved).
    shard_up: IntGaugeVec,
    fanned_out: Mutex<Remembered>,
    completed: Mutex<Remembered>,
    final_counts: Mutex<Option<FinalCounts>>,
}

/// The last count of final host jobs by state, and when it was taken.
type FinalCounts = (Instant, Vec<(String, u64)>);

impl Default for DispatchMetrics {
    fn default() -> Self {
        DispatchMetrics::new()
    }
}

fn seconds_since(ms: i64) -> f64 {
    (polaris_ops_wire::wire::unix_now_ms().saturating_sub(ms)).max(0) as f64 / 1000.0
}

impl DispatchMetrics {
    /// The families, registered and empty.
    pub fn new() -> DispatchMetrics {
        Self::build().expect("constant metric options are valid")
    }

    fn build() -> prometheus::Result<DispatchMetrics> {
        let registry = Registry::new();
        let http_requests = IntCounterVec::new(
            Opts::new("polaris_dispatch_http_requests_total", "HTTP requests by method, route template and status."),
            &["method", "route", "status"],
        )?;
        let http_seconds = HistogramVec::new(
            HistogramOpts::new(
                "polaris_dispatch_http_request_duration_seconds",
                "Time to answer an HTTP request, by method and route template.",
            )
            .buckets(polaris_metrics::buckets::HTTP_SECONDS.to_vec()),
            &["method", "route"],
        )?;
        let host_jobs = IntGaugeVec::new(
            Opts::new(
                "polaris_dispatch_host_jobs",
                "Host jobs in the database by state; the final states (success, failed, revoked, expired) are counted at most once a minute.",
            ),
            &["state"],
        )?;
        let job_histogram = |name: &str, help: &str| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(polaris_metrics::buckets::JOB_SECONDS.to_vec()))
        };
        let fanout = job_histogram(
            "polaris_dispatch_fanout_seconds",
            "Time from a job being accepted to the last of its envelopes being put on the queue.",
        )?;
        let completion = job_histogram(
            "polaris_dispatch_completion_seconds",
            "Time from a job being accepted to every one of its hosts being final.",
        )?;
        let queue_connected = IntGaugeVec::new(
            Opts::new(
                "polaris_dispatch_queue_connected",
                "1 when the worker's last use of the queue succeeded, else 0; by worker (enqueuer, results).",
            ),
            &["worker"],
        )?;
        let queue_reconnects = IntCounterVec::new(
            Opts::new(
                "polaris_dispatch_queue_reconnects_total",
                "Times a worker reached the queue again after losing it, by worker.",
            ),
            &["worker"],
        )?;
        let shard_up = IntGaugeVec::new(
            Opts::new(
                "polaris_dispatch_queue_shard_up",
                "Per queue shard (--queue address): 1 while it answers, 0 while it does not, -1 once it has \
                 been unreachable past --shard-grace and its hosts moved to the others.",
            ),
            &["shard"],
        )?;
        let info = prometheus::IntGauge::with_opts(
            Opts::new("polaris_dispatch_build_info", "Always 1; the version is a label.")
                .const_label("version", env!("CARGO_PKG_VERSION")),
        )?;
        info.set(1);
        registry.register(Box::new(info))?;
        registry.register(Box::new(http_requests.clone()))?;
        registry.register(Box::new(http_seconds.clone()))?;
        registry.register(Box::new(host_jobs.clone()))?;
        registry.register(Box::new(fanout.clone()))?;
        registry.register(Box::new(completion.clone()))?;
        registry.register(Box::new(queue_connected.clone()))?;
        registry.register(Box::new(queue_reconnects.clone()))?;
        registry.register(Box::new(shard_up.clone()))?;
        for user in [QueueUser::Enqueuer, QueueUser::Results] {
            queue_connected.with_label_values(&[user.label()]).set(0);
            queue_reconnects.with_label_values(&[user.label()]);
        }
        for state in ALL_STATES {
            host_jobs.with_label_values(&[state.as_str()]).set(0);
        }
        Ok(DispatchMetrics {
            registry,
            http_requests,
            http_seconds,
            host_jobs,
            fanout,
            completion,
            queue_connected,
            queue_reconnects,
            shard_up,
            fanned_out: Mutex::default(),
            completed: Mutex::default(),
            final_counts: Mutex::new(None),
        })
    }

    /// One HTTP request answered. `route` is the matched route template, `None` when no
    /// route matched.
    pub fn http_request(&self, method: &str, route: Option<&str>, status: u16, took: Duration) {
        let method = KNOWN_METHODS.iter().find(|m| **m == method).copied().unwrap_or("other");
        let route = route.unwrap_or("unmatched");
        self.http_requests.with_label_values(&[method, route, &status.to_string()]).inc();
        self.http_seconds.with_label_values(&[method, route]).observe(took.as_secs_f64());
    }

    /// The enqueuer put envelopes of job `id`: if none of its host jobs waits to be put any
    /// more, its fan-out is observed (once).
    pub fn envelopes_put(&self, store: &Store, id: &str) -> Result<(), StoreError> {
        if let Some((created_at_ms, false)) = store.job_fanout_state(id)? {
            if self.fanned_out.lock().unwrap_or_else(|p| p.into_inner()).first_time(id) {
                self.fanout.observe(seconds_since(created_at_ms));
            }
        }
        Ok(())
    }

    /// A host job of job `id` became final: if every one now is, its completion is
    /// observed (once).
    pub fn host_job_final(&self, store: &Store, id: &str) -> Result<(), StoreError> {
        if let Some(created_at_ms) = store.job_completed_since(id)? {
            if self.completed.lock().unwrap_or_else(|p| p.into_inner()).first_time(id) {
                self.completion.observe(seconds_since(created_at_ms));
            }
        }
        Ok(())
    }

    /// A worker's use of the queue succeeded (`up`) or failed; `reconnected` when it
    /// succeeded after failing.
    pub fn queue_state(&self, user: QueueUser, up: bool, reconnected: bool) {
        self.queue_connected.with_label_values(&[user.label()]).set(i64::from(up));
        if reconnected {
            self.queue_reconnects.with_label_values(&[user.label()]).inc();
        }
    }

    /// The exposition text; reads the database (blocking).
    pub fn render(&self, store: &Store, queues: &crate::shard::Shards) -> Result<String, StoreError> {
        for shard in queues.all() {
            let up = match shard.down_for() {
                None => 1,
                Some(_) if queues.is_dead(shard) => -1,
                Some(_) => 0,
            };
            self.shard_up.with_label_values(&[shard.name.as_str()]).set(up);
        }
        let open = store.host_job_counts(false)?;
        let finals = {
            let mut cached = self.final_counts.lock().unwrap_or_else(|p| p.into_inner());
            match &*cached {
                Some((at, counts)) if at.elapsed() < FINAL_COUNTS_MAX_AGE => counts.clone(),
                _ => {
                    let counts: Vec<(String, u64)> = store
                        .host_job_counts(true)?
                        .into_iter()
                        .filter(|(state, _)| !matches!(state.as_str(), "pending" | "ready" | "reserved"))
                        .collect();
                    *cached = Some((Instant::now(), counts.clone()));
                    counts
                }
            }
        };
        for state in ALL_STATES {
            let n = open.iter().chain(&finals).find(|(s, _)| s == state.as_str()).map_or(0, |(_, n)| *n);
            self.host_jobs.with_label_values(&[state.as_str()]).set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        Ok(polaris_metrics::render(&self.registry))
    }
}

const ALL_STATES: [HostState; 7] = [
    HostState::Pending,
    HostState::Ready,
    HostState::Reserved,
    HostState::Success,
    HostState::Failed,
    HostState::Revoked,
    HostState::Expired,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_is_observed_once() {
        let mut seen = Remembered::default();
        assert!(seen.first_time("a"));
        assert!(!seen.first_time("a"));
        for i in 0..REMEMBERED_JOBS {
            seen.first_time(&i.to_string());
        }
        assert!(seen.first_time("a"), "forgotten after {REMEMBERED_JOBS} others");
    }

    #[test]
    fn unknown_methods_share_one_series() {
        let m = DispatchMetrics::new();
        m.http_request("BREW", None, 404, Duration::from_millis(1));
        m.http_request("GET", Some("/v1/jobs/:id"), 200, Duration::from_millis(1));
        let text = polaris_metrics::render(&m.registry);
        assert!(text.contains(r#"method="other",route="unmatched",status="404""#), "{text}");
        assert!(text.contains(r#"method="GET",route="/v1/jobs/:id",status="200""#), "{text}");
    }
}
