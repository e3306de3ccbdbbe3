//! The result of a run: one JSON line ([`Record`]), printed and appended to `--out`.

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

/// Prints `rec` as one JSON line on stdout and appends it to `out`, if given.
pub(crate) fn emit(rec: &Record, out: Option<&PathBuf>) -> Result<()> {
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
