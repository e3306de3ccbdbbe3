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
//! - `report`: turn result lines into a Markdown table with ratios;
//! - `fleet`: a fleet simulator: thousands of simulated `polaris-agent`s in one process,
//!   each a real queue connection, registered with `polaris-dispatch`, and a driver that
//!   times fan-outs of one job to all of them through the dispatcher(s);
//! - `fleet-report`: turn `fleet` result lines into a Markdown table.
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
//! - `procfs`: a process's CPU time (in all, and by thread), RSS and peak RSS from
//!   `/proc/PID`, and its children ([`proc_cpu_secs`], [`proc_threads`], [`proc_rss_kb`],
//!   [`proc_peak_rss_kb`], [`proc_tree`]); the whole machine's busy time
//!   ([`machine_busy_secs`]).
//! - `percentile`: exact nearest-rank percentiles of a sorted sample.
//! - `fleet`: the `fleet` subcommand: registers, connects, drives, reads each process's
//!   CPU and memory, emits a [`FleetRecord`].
//! - `register`: the simulated hosts' `POST /v1/hosts`, and the queue shard each is given.
//! - `sim`: the simulated agents' `mio` event loops (reserve, answer, delete).
//! - `answer`: what a simulated agent answers to one envelope, as polaris-agent would.
//! - `drive`: the measurement driver: fan-outs posted to the dispatchers, followed to done.
//! - `fleet_report`: `fleet` result lines in, a Markdown table out.
//! - `sys`: every call into the operating system (rlimits, CPU clock, clock ticks, the
//!   restarted server's parent-death signal and SIGTERM), the only module allowed `unsafe`.

#![deny(unsafe_code)]

mod answer;
mod blocking;
mod drive;
mod fleet;
mod fleet_report;
mod load;
mod percentile;
mod procfs;
mod record;
mod register;
mod reply;
mod report;
mod restart;
mod sim;
#[allow(unsafe_code)]
mod sys;

pub use procfs::{machine_busy_secs, proc_cpu_secs, proc_peak_rss_kb, proc_rss_kb, proc_threads, proc_tree};
pub use record::{FleetRecord, ProcUse, Record, ThreadUse};

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
    /// Simulate a fleet of agents and time fan-outs to all of them through the dispatcher.
    Fleet(FleetArgs),
    /// Turn `fleet` result lines (JSON) into a Markdown table.
    FleetReport(FleetReportArgs),
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

/// Options of `fleet`.
#[derive(Args, Debug, Clone)]
pub struct FleetArgs {
    /// Hosts in the fleet, `sim-00001` to `sim-<N>`; every fan-out targets them all.
    #[arg(long, default_value_t = 1000)]
    pub hosts: usize,
    /// The first host this process simulates (from 1).
    #[arg(long, default_value_t = 1)]
    pub first: usize,
    /// Hosts this process simulates (default: from --first to --hosts). The rest are
    /// simulated by other `fleet --serve-only` processes (one process holds at most
    /// RLIMIT_NOFILE connections).
    #[arg(long)]
    pub count: Option<usize>,
    /// Only simulate the hosts (register, connect, answer) until killed; drive nothing.
    #[arg(long)]
    pub serve_only: bool,
    /// Write this file once every host of this process is registered and connected.
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
    /// Dispatcher base URL (repeatable): hosts register and jobs go to each in turn.
    #[arg(long = "dispatch", required = true)]
    pub dispatchers: Vec<String>,
    /// Queue address of hosts whose registration answer names no `"queue"`.
    #[arg(long, default_value = "127.0.0.1:11300")]
    pub queue: String,
    /// File holding the shared envelope secret (as polaris-agent's); else env POLARIS_SECRET.
    #[arg(long)]
    pub secret_file: Option<PathBuf>,
    /// Each simulated command's time, milliseconds.
    #[arg(long, default_value_t = 0)]
    pub command_ms: u64,
    /// Up to this many more milliseconds per command, uniformly at random.
    #[arg(long, default_value_t = 0)]
    pub jitter_ms: u64,
    /// Share of commands (0 to 1) that exit 1 (reported `success`, retcode 1).
    #[arg(long, default_value_t = 0.0)]
    pub failure_rate: f64,
    /// Bytes of output each command prints.
    #[arg(long, default_value_t = 0)]
    pub output_bytes: usize,
    /// The agents' `reserve-with-timeout` seconds (polaris-agent: 1); 0 sends plain `reserve`.
    #[arg(long, default_value_t = 1)]
    pub reserve_timeout: u32,
    /// Event-loop threads of the simulated agents.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Registrations in flight at once.
    #[arg(long, default_value_t = 8)]
    pub register_threads: usize,
    /// Timed rounds, one fan-out at a time (p50/p99 of the time to every host's answer).
    #[arg(long, default_value_t = 10)]
    pub rounds: usize,
    /// Untimed rounds before those.
    #[arg(long, default_value_t = 1)]
    pub warmup_rounds: usize,
    /// Fan-outs of the throughput phase (0: none).
    #[arg(long, default_value_t = 6)]
    pub throughput_fanouts: usize,
    /// Fan-outs in flight at once in the throughput phase.
    #[arg(long, default_value_t = 3)]
    pub in_flight: usize,
    /// Most hosts in one job (the dispatcher takes up to 10,000): a bigger fleet's fan-out
    /// is several jobs, posted back to back.
    #[arg(long, default_value_t = 10_000)]
    pub max_hosts_per_job: usize,
    /// The jobs' command (the simulator runs none).
    #[arg(long, default_value = "true")]
    pub cmd: String,
    /// The jobs' `timeout`, seconds (an agent must start a job within it).
    #[arg(long, default_value_t = 600)]
    pub job_timeout: u32,
    /// Least milliseconds between polls of the job listing (they space out to 2% of the
    /// oldest fan-out's age).
    #[arg(long, default_value_t = 50)]
    pub poll_ms: u64,
    /// Seconds of idle fleet (connected, no job) measured before the rounds.
    #[arg(long, default_value_t = 3.0)]
    pub idle_secs: f64,
    /// A process to measure, `NAME=PID` (repeatable); its children count with it. This
    /// process is always measured, as `sim`.
    #[arg(long = "proc", value_parser = parse_proc)]
    pub procs: Vec<(String, u32)>,
    /// Label: shards (default: the distinct queues the registrations named).
    #[arg(long)]
    pub shards: Option<usize>,
    /// Label: database (`sqlite`, `postgres`).
    #[arg(long, default_value = "")]
    pub db: String,
    /// Label: configuration (copied into the result).
    #[arg(long, default_value = "")]
    pub config: String,
    /// Append the result line to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Parses `NAME=PID`.
fn parse_proc(s: &str) -> Result<(String, u32), String> {
    let (name, pid) = s.split_once('=').ok_or_else(|| format!("{s:?} is not NAME=PID"))?;
    let pid = pid.trim().parse::<u32>().map_err(|e| format!("{s:?}: the pid: {e}"))?;
    if name.is_empty() || pid == 0 {
        return Err(format!("{s:?} is not NAME=PID"));
    }
    Ok((name.to_string(), pid))
}

/// Options of `fleet-report`.
#[derive(Args, Debug, Clone)]
pub struct FleetReportArgs {
    /// `fleet` result lines (JSON), as written by --out.
    #[arg(long)]
    pub input: PathBuf,
    /// Write the Markdown here too.
    #[arg(long)]
    pub md: Option<PathBuf>,
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
        Cmd::Fleet(a) => fleet::run_fleet(&a),
        Cmd::FleetReport(a) => fleet_report::fleet_report(&a),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("polaris-bench: {e:#}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_flags() {
        assert_eq!(parse_proc("polarisd-1=4242"), Ok(("polarisd-1".to_string(), 4242)));
        assert!(parse_proc("polarisd").is_err());
        assert!(parse_proc("=12").is_err());
        assert!(parse_proc("x=0").is_err());
        assert!(parse_proc("x=-3").is_err());
        let cli = Cli::try_parse_from([
            "polaris-bench",
            "fleet",
            "--dispatch",
            "http://127.0.0.1:8080",
            "--dispatch",
            "http://127.0.0.1:8081",
            "--proc",
            "dispatch-1=7",
        ])
        .expect("parses");
        let Cmd::Fleet(args) = cli.command else { panic!("not fleet") };
        assert_eq!(args.dispatchers.len(), 2);
        assert_eq!((args.hosts, args.reserve_timeout, args.max_hosts_per_job), (1000, 1, 10_000));
        assert_eq!(args.procs, vec![("dispatch-1".to_string(), 7)]);
    }
}
