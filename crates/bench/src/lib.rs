//! A load generator for any beanstalk server (beanstalkd, polarisd, ...).
//!
//! One thread drives every connection through a `mio` poll loop, so the load
//! generator uses at most one core and leaves the rest to the server. Each
//! connection keeps up to `--depth` commands in flight; commands are written in
//! batches (one `write` for everything a connection may send) and replies are
//! parsed in bulk from one `read`.
//!
//! Modes (subcommands):
//! - `put`: producers put jobs for `--duration` seconds (put-only throughput);
//! - `drain`: consumers reserve and delete the ready jobs already in the server;
//! - `pipeline`: producers and consumers at once, put -> reserve -> delete;
//! - `latency`: producers put at a fixed `--rate` with a timestamp in the body,
//!   blocked consumers measure put-to-reserve latency (every sample is kept and
//!   sorted, so p50/p99/p99.9 are exact);
//! - `fill`: put `--jobs` jobs, then report the server's RSS;
//! - `restart`: spawn a server, time until it answers, check its job count;
//! - `ping`, `free-port`: helpers for scripts;
//! - `report`: turn result lines into a Markdown table with ratios.
//!
//! Every load mode can hold `--idle K` extra connections open (connected and
//! answered once) while it runs. With `--pid`, the server's CPU time (from
//! `/proc/PID/task/*/schedstat`, nanosecond precision, or `/proc/PID/stat`)
//! is read at the edges of the measured window and reported per job, and its
//! RSS from `/proc/PID/status`.
//!
//! Each run prints one JSON line (a [`Record`]) on stdout and appends it to
//! `--out`. A "job" is one put (`put`, `fill`), one reserve+delete (`drain`),
//! or one put+reserve+delete (`pipeline`, `latency`).
//!
//! # Layout
//! - this file: the command line ([`Cli`], [`Cmd`] and their options) and [`main`].
//! - `load`: the `mio` load loop of `put`, `drain`, `pipeline`, `latency` and `fill`.
//! - `restart`: spawn a server, time it until it answers, check its job count.
//! - `report`: result lines in, the Markdown table of ratios and targets out.
//! - `record`: the result line ([`Record`]) and how it is written.
//! - `blocking`: blocking helpers: `ping`, connection setup, idle connections, `free-port`.
//! - `reply`: reply framing and numbers, on top of `polaris_proto`'s scanner and constants.
//! - `procfs`: the server's CPU time and RSS from `/proc/PID` ([`proc_cpu_secs`], [`proc_rss_kb`]).
//! - `sys`: every call into the operating system (rlimits, CPU clock, clock ticks, the
//!   restarted server's parent-death signal and SIGTERM), the only module allowed `unsafe`.

#![deny(unsafe_code)]

mod blocking;
mod load;
mod procfs;
mod record;
mod reply;
mod report;
mod restart;
#[allow(unsafe_code)]
mod sys;

pub use procfs::{proc_cpu_secs, proc_rss_kb};
pub use record::Record;

use clap::{Args, Parser, Subcommand};
use load::Mode;
use std::path::PathBuf;
use std::time::Duration;

/// `polaris-bench`: benchmark any beanstalk server.
#[derive(Parser, Debug)]
#[command(name = "polaris-bench", about, long_about = None, args_override_self = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Cmd,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Put-only throughput: producers put jobs for --duration seconds.
    Put(LoadArgs),
    /// Reserve+delete throughput: consumers drain the jobs already ready in the server.
    Drain(LoadArgs),
    /// Concurrent producers and consumers: put -> reserve -> delete.
    Pipeline(LoadArgs),
    /// Put-to-reserve latency at a fixed --rate (body carries a timestamp).
    Latency(LoadArgs),
    /// Put --jobs jobs, then report the server's RSS.
    Fill(LoadArgs),
    /// Spawn the server given after `--`, time until it answers `stats`, check its job count.
    Restart(RestartArgs),
    /// Wait until a server answers a command; exit 1 if it does not in time.
    Ping(PingArgs),
    /// Print a free loopback TCP port.
    FreePort,
    /// Turn result lines (JSON) into a Markdown results table with ratios and targets.
    Report(ReportArgs),
}

/// Options shared by the load modes.
#[derive(Args, Debug, Clone)]
pub struct LoadArgs {
    /// Server address.
    #[arg(long, default_value = "127.0.0.1:11300")]
    pub addr: String,
    /// Server process id: its CPU time and RSS are read from /proc/PID.
    #[arg(long)]
    pub pid: Option<u32>,
    /// Connections. `pipeline` and `latency` split them between producers and
    /// consumers unless --producers/--consumers say otherwise.
    #[arg(long, default_value_t = 16)]
    pub conns: usize,
    /// Producer connections (pipeline, latency).
    #[arg(long)]
    pub producers: Option<usize>,
    /// Consumer connections (pipeline, latency).
    #[arg(long)]
    pub consumers: Option<usize>,
    /// Commands in flight per connection (puts per producer, reserves per consumer).
    #[arg(long, default_value_t = 16)]
    pub depth: usize,
    /// Reserves in flight per consumer (default: --depth).
    #[arg(long)]
    pub reserve_depth: Option<usize>,
    /// Job body size in bytes.
    #[arg(long, default_value_t = 100)]
    pub size: usize,
    /// Tubes: producer i uses tube i mod N, consumers watch all of them (1 = `default`).
    #[arg(long, default_value_t = 1)]
    pub tubes: usize,
    /// Measured seconds (put, pipeline, latency; drain stops after this long).
    #[arg(long, default_value_t = 3.0)]
    pub duration: f64,
    /// Seconds of load before the measurement starts (put, pipeline, latency).
    #[arg(long, default_value_t = 0.5)]
    pub warmup: f64,
    /// fill: jobs to put. drain: most jobs to drain (default: every ready job).
    #[arg(long)]
    pub jobs: Option<u64>,
    /// latency: jobs per second offered.
    #[arg(long, default_value_t = 10_000.0)]
    pub rate: f64,
    /// pipeline: most jobs put but not yet reserved before producers wait.
    #[arg(long, default_value_t = 10_000)]
    pub max_backlog: u64,
    /// Idle connections to hold open while the load runs.
    #[arg(long, default_value_t = 0)]
    pub idle: usize,
    /// Priority of the jobs put.
    #[arg(long, default_value_t = 0)]
    pub pri: u32,
    /// TTR of the jobs put.
    #[arg(long, default_value_t = 60)]
    pub ttr: u32,
    /// Give up on a count-bound run (fill, the tail of put) after this many seconds.
    #[arg(long, default_value_t = 600.0)]
    pub timeout: f64,
    /// Label: which server this is (copied into the result).
    #[arg(long, default_value = "")]
    pub server: String,
    /// Label: which configuration (copied into the result).
    #[arg(long, default_value = "")]
    pub config: String,
    /// Label: scenario name (default: the mode).
    #[arg(long)]
    pub scenario: Option<String>,
    /// Append the result line to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Options of `restart`.
#[derive(Args, Debug, Clone)]
pub struct RestartArgs {
    /// Address the spawned server listens on.
    #[arg(long)]
    pub addr: String,
    /// Fail unless the server reports this many jobs (ready+delayed+buried).
    #[arg(long)]
    pub expect_jobs: Option<u64>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 120.0)]
    pub timeout: f64,
    /// Label: server.
    #[arg(long, default_value = "")]
    pub server: String,
    /// Label: configuration.
    #[arg(long, default_value = "")]
    pub config: String,
    /// Label: scenario.
    #[arg(long, default_value = "restart")]
    pub scenario: String,
    /// Append the result line to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The server command line.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// Options of `ping`.
#[derive(Args, Debug, Clone)]
pub struct PingArgs {
    /// Server address.
    #[arg(long, default_value = "127.0.0.1:11300")]
    pub addr: String,
    /// Seconds to keep trying.
    #[arg(long, default_value_t = 10.0)]
    pub timeout: f64,
}

/// Options of `report`.
#[derive(Args, Debug, Clone)]
pub struct ReportArgs {
    /// Result lines (JSON), as written by --out.
    #[arg(long)]
    pub input: PathBuf,
    /// Write the Markdown here too.
    #[arg(long)]
    pub md: Option<PathBuf>,
    /// Server taken as the baseline (denominator of ratios).
    #[arg(long, default_value = "beanstalkd")]
    pub baseline: String,
    /// Server measured against the baseline (numerator of ratios).
    #[arg(long, default_value = "polarisd")]
    pub candidate: String,
}

/// Runs the command line; returns the process exit code.
pub fn main(cli: Cli) -> i32 {
    let result = match cli.command {
        Cmd::Put(a) => load::run_load(Mode::Put, a),
        Cmd::Drain(a) => load::run_load(Mode::Drain, a),
        Cmd::Pipeline(a) => load::run_load(Mode::Pipeline, a),
        Cmd::Latency(a) => load::run_load(Mode::Latency, a),
        Cmd::Fill(a) => load::run_load(Mode::Fill, a),
        Cmd::Restart(a) => restart::run_restart(a),
        Cmd::Ping(a) => blocking::ping(&a.addr, Duration::from_secs_f64(a.timeout)).map(|_| ()),
        Cmd::FreePort => blocking::free_port(),
        Cmd::Report(a) => report::report(&a),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("polaris-bench: {e:#}");
            1
        }
    }
}
