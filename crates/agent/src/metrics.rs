//! `--metrics ADDR`: what this agent did, for Prometheus. The values are prometheus
//! types updated where the work happens; [`polaris_metrics`] serves them from a thread
//! of their own, so a scrape never touches a running job.

use polaris_ops_wire::codes::Code;
use polaris_ops_wire::wire::{HostResult, Method, Resp};
use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use std::time::Duration;

/// The agent's metric families.
#[derive(Clone, Debug)]
pub struct AgentMetrics {
    registry: Registry,
    jobs: IntCounterVec,
    duration: HistogramVec,
    timeouts: IntCounterVec,
    refusals: IntCounterVec,
    running: IntGauge,
    queue_connected: IntGauge,
    queue_connects: IntCounter,
}

/// How a run ended, as the `outcome` label says it.
pub fn outcome_label(result: &HostResult) -> &'static str {
    match (result.resp, result.retcode) {
        (Resp::Success, 0) => "succeeded",
        // A non-zero exit status, or a signal (128 + N).
        (Resp::Success, _) => "failed",
        (Resp::Failed, code) if code == u32::from(Code::ExecTimeout.value()) => "timed_out",
        (Resp::Failed, code) if code == u32::from(Code::AgentRestarted.value()) => "aborted",
        (Resp::Failed, _) => "error",
    }
}

impl AgentMetrics {
    /// The families, registered and at zero.
    pub fn new() -> AgentMetrics {
        Self::build().expect("constant metric options are valid")
    }

    fn build() -> prometheus::Result<AgentMetrics> {
        let registry = Registry::new();
        let jobs = IntCounterVec::new(
            Opts::new(
                "polaris_agent_jobs_total",
                "Jobs run, by method and outcome (succeeded, failed: non-zero exit or signal, timed_out, aborted, error).",
            ),
            &["method", "outcome"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "polaris_agent_job_duration_seconds",
                "Time from start to result of each job run, by method.",
            )
            .buckets(polaris_metrics::buckets::JOB_SECONDS.to_vec()),
            &["method"],
        )?;
        let timeouts = IntCounterVec::new(
            Opts::new(
                "polaris_agent_timeouts_total",
                "Commands killed for running past their timeout, by the signal that ended them (SIGTERM, or SIGKILL after the grace).",
            ),
            &["signal"],
        )?;
        let refusals = IntCounterVec::new(
            Opts::new(
                "polaris_agent_refusals_total",
                "Envelopes buried and not run, by result code label (bad_signature, wrong_host, envelope_expired, ...).",
            ),
            &["code"],
        )?;
        let running = IntGauge::new("polaris_agent_running_jobs", "Jobs running now (0 or 1).")?;
        let queue_connected =
            IntGauge::new("polaris_agent_queue_connected", "1 while the agent holds a queue connection, else 0.")?;
        let queue_connects = IntCounter::new(
            "polaris_agent_queue_connects_total",
            "Queue connections made (the first, then reconnects).",
        )?;
        registry.register(Box::new(jobs.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(timeouts.clone()))?;
        registry.register(Box::new(refusals.clone()))?;
        registry.register(Box::new(running.clone()))?;
        registry.register(Box::new(queue_connected.clone()))?;
        registry.register(Box::new(queue_connects.clone()))?;
        let info = IntGauge::with_opts(
            Opts::new("polaris_agent_build_info", "Always 1; the version is a label.")
                .const_label("version", env!("CARGO_PKG_VERSION")),
        )?;
        info.set(1);
        registry.register(Box::new(info))?;
        Ok(AgentMetrics { registry, jobs, duration, timeouts, refusals, running, queue_connected, queue_connects })
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        polaris_metrics::render(&self.registry)
    }

    /// A job started.
    pub fn started(&self) {
        self.running.inc();
    }

    /// A job ran (started earlier with [`AgentMetrics::started`]) and ended with `result`
    /// after `took`.
    pub fn finished(&self, method: Method, result: &HostResult, took: Duration) {
        self.running.dec();
        self.jobs.with_label_values(&[method.as_str(), outcome_label(result)]).inc();
        self.duration.with_label_values(&[method.as_str()]).observe(took.as_secs_f64());
    }

    /// A command was killed for its timeout, finally by `signal` (e.g. `SIGTERM`).
    pub fn timed_out(&self, signal: &str) {
        self.timeouts.with_label_values(&[signal]).inc();
    }

    /// An envelope was refused with `code`.
    pub fn refused(&self, code: Code) {
        self.refusals.with_label_values(&[code.label()]).inc();
    }

    /// The queue connection came up (`true`) or was lost (`false`).
    pub fn queue_connection(&self, up: bool) {
        if up {
            self.queue_connects.inc();
        }
        self.queue_connected.set(i64::from(up));
    }
}

impl Default for AgentMetrics {
    fn default() -> Self {
        AgentMetrics::new()
    }
}
