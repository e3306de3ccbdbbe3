//! The result of a run: one JSON line ([`Record`], or a [`FleetRecord`] for `fleet`),
//! printed and appended to `--out`.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::PathBuf;

/// One result line.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct Record {
    /// Scenario label.
    pub scenario: String,
    /// Configuration label.
    pub config: String,
    /// Server label.
    pub server: String,
    /// Mode that produced the record.
    pub mode: String,
    /// Producer connections.
    pub producers: usize,
    /// Consumer connections.
    pub consumers: usize,
    /// Commands in flight per connection.
    pub depth: usize,
    /// Reserves in flight per consumer.
    #[serde(default)]
    pub reserve_depth: usize,
    /// Body size.
    pub size: usize,
    /// Tubes.
    pub tubes: usize,
    /// Idle connections held open.
    pub idle: usize,
    /// Jobs completed in the measured window.
    pub jobs: u64,
    /// Length of the measured window in seconds.
    pub secs: f64,
    /// Jobs per second.
    pub jobs_per_s: f64,
    /// Server CPU seconds (user+system) in the window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_cpu_s: Option<f64>,
    /// Server CPU microseconds per job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_cpu_us_per_job: Option<f64>,
    /// Load generator CPU seconds in the window.
    pub client_cpu_s: f64,
    /// Latency samples.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub samples: Option<u64>,
    /// Median put-to-reserve latency, microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p50_us: Option<f64>,
    /// 99th percentile, microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_us: Option<f64>,
    /// 99.9th percentile, microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p999_us: Option<f64>,
    /// Largest sample, microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_us: Option<f64>,
    /// The longest event-loop turn the server reports since it started (polarisd's
    /// `polaris-stats` `longest-turn-us`; beanstalkd has no such figure), microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub longest_turn_us: Option<f64>,
    /// Server RSS at the end, KiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rss_kb: Option<u64>,
    /// Server RSS before the run, KiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rss_before_kb: Option<u64>,
    /// Seconds from spawn to the first answer (restart).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_s: Option<f64>,
    /// Unexpected replies.
    pub errors: u64,
}

/// One `fleet` result line: a fleet of simulated agents, the fan-outs to all of them, and
/// what each process used.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct FleetRecord {
    /// Configuration label.
    pub config: String,
    /// Hosts in the fleet (every fan-out targets all of them).
    pub hosts: usize,
    /// Of those, simulated by the driving process (the rest by `--serve-only` helpers).
    pub simulated_here: usize,
    /// Queue shards (label; by default the distinct queues the registrations named).
    pub shards: usize,
    /// Distinct queues the registrations of this process's hosts named.
    pub queues_seen: usize,
    /// Dispatchers jobs and registrations went to.
    pub dispatchers: usize,
    /// Database label (`sqlite`, `postgres`).
    pub db: String,
    /// Each simulated command's time, ms (plus up to `jitter_ms`).
    pub command_ms: u64,
    /// Random extra command time, up to this many ms.
    pub jitter_ms: u64,
    /// Share of commands that exit 1.
    pub failure_rate: f64,
    /// Output bytes per command.
    pub output_bytes: usize,
    /// The agents' `reserve-with-timeout` seconds (0: plain `reserve`).
    pub reserve_timeout: u32,
    /// Seconds to register this process's hosts.
    pub register_s: f64,
    /// Seconds to connect their agents to the queue.
    pub connect_s: f64,
    /// Jobs per fan-out (hosts / max hosts per job, rounded up).
    pub jobs_per_fanout: usize,
    /// Latency rounds (one fan-out at a time), after the warm-up ones.
    pub rounds: usize,
    /// Median time from the POST to the last result recorded, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p50_s: Option<f64>,
    /// 99th percentile of the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_s: Option<f64>,
    /// Slowest round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_s: Option<f64>,
    /// Median time from the POST to the poll that saw the fan-out done, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_p50_s: Option<f64>,
    /// 99th percentile of the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_p99_s: Option<f64>,
    /// Fan-outs in flight at once in the throughput phase.
    pub in_flight: usize,
    /// Fan-outs in the throughput phase.
    pub throughput_fanouts: usize,
    /// Length of the throughput phase, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throughput_s: Option<f64>,
    /// Dispatcher jobs finished per second in the throughput phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jobs_per_s: Option<f64>,
    /// Host results recorded per second in the throughput phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_results_per_s: Option<f64>,
    /// The phase process CPU is measured over (`throughput`, else `latency`).
    pub cpu_window: String,
    /// Its length, seconds.
    pub window_s: f64,
    /// Length of the idle window (connected fleet, no job) before the rounds, seconds.
    pub idle_s: f64,
    /// What each process used.
    pub procs: Vec<ProcUse>,
    /// Cores the whole machine kept busy in the window: beyond the processes measured,
    /// this is other load on a shared machine (which the figures then include).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_busy_cores: Option<f64>,
    /// Results this process's agents put.
    pub answered: u64,
    /// Of those, commands that exited non-zero.
    pub nonzero: u64,
    /// Refused envelopes and unexpected queue replies (any fails the run).
    pub errors: u64,
    /// CPUs of the machine.
    pub cores: usize,
}

/// One process's (and its children's) CPU and memory in a fleet run.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct ProcUse {
    /// Its label (`polarisd-1`, `dispatch-2`, `postgres`, `sim`).
    pub name: String,
    /// Its pid.
    pub pid: u32,
    /// Processes in its tree at the end (itself and its children).
    pub processes: usize,
    /// CPU seconds in the measured window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_s: Option<f64>,
    /// The same per second of the window: cores kept busy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cores: Option<f64>,
    /// CPU microseconds per host result in the window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub us_per_host: Option<f64>,
    /// Cores kept busy by the idle fleet (connected, no job).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_cores: Option<f64>,
    /// Peak RSS (`VmHWM`, summed over the tree), KiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_rss_kb: Option<u64>,
    /// Its busiest threads in the window (of every process in the tree), busiest first.
    #[serde(default)]
    pub threads: Vec<ThreadUse>,
}

/// One thread's CPU in a fleet run's measured window.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
pub struct ThreadUse {
    /// Its name (`comm`: `results`, `enqueuer`, `tokio-runtime-w`, `postgres`).
    pub name: String,
    /// Cores it kept busy (CPU seconds per second of the window).
    pub cores: f64,
}

/// Prints `rec` as one JSON line on stdout and appends it to `out`, if given.
pub(crate) fn emit<R: Serialize>(rec: &R, out: Option<&PathBuf>) -> Result<()> {
    let line = serde_json::to_string(rec)?;
    println!("{line}");
    if let Some(path) = out {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        writeln!(f, "{line}")?;
    }
    Ok(())
}
