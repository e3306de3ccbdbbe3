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

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

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

/// Runs the command line; returns the process exit code.
pub fn main(cli: Cli) -> i32 {
    let result = match cli.command {
        Cmd::Put(a) => run_load(Mode::Put, a),
        Cmd::Drain(a) => run_load(Mode::Drain, a),
        Cmd::Pipeline(a) => run_load(Mode::Pipeline, a),
        Cmd::Latency(a) => run_load(Mode::Latency, a),
        Cmd::Fill(a) => run_load(Mode::Fill, a),
        Cmd::Restart(a) => run_restart(a),
        Cmd::Ping(a) => ping(&a.addr, Duration::from_secs_f64(a.timeout)).map(|_| ()),
        Cmd::FreePort => free_port(),
        Cmd::Report(a) => report(&a),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("polaris-bench: {e:#}");
            1
        }
    }
}

// ----- /proc ------------------------------------------------------------------

/// CPU seconds the process has used: the sum of its threads' run time from
/// `schedstat` (nanoseconds), or utime+stime from `stat` (clock ticks).
pub fn proc_cpu_secs(pid: u32) -> Option<f64> {
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        let mut total: u64 = 0;
        let mut any = false;
        for entry in dir.flatten() {
            let path = entry.path().join("schedstat");
            if let Some(ns) =
                std::fs::read_to_string(path).ok().and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            {
                total += ns;
                any = true;
            }
        }
        if any && total > 0 {
            return Some(total as f64 / 1e9);
        }
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Field 3 (state) is fields[0]; utime and stime are fields 14 and 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some((utime + stime) as f64 / hz)
}

/// The process's resident set size in KiB (`VmRSS`).
pub fn proc_rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// CPU seconds used by this process.
fn self_cpu_secs() -> f64 {
    // SAFETY: an all-zero rusage is a valid out-parameter.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is valid for writes.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Raises the soft open-file limit to the hard one; returns the new soft limit.
fn raise_nofile() -> u64 {
    // SAFETY: an all-zero rlimit is a valid out-parameter.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: `lim` is valid for reads and writes.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
    lim.rlim_cur as u64
}

// ----- blocking helpers ---------------------------------------------------------

/// Sends `cmd` and reads exactly one reply (a line, or `OK <n>` and its body).
fn sync_cmd(stream: &mut std::net::TcpStream, cmd: &[u8]) -> Result<Vec<u8>> {
    stream.write_all(cmd)?;
    read_one_reply(stream)
}

fn read_one_reply(stream: &mut std::net::TcpStream) -> Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = find_crlf(&buf) {
            if let Some(n) = buf.strip_prefix(b"OK ").and_then(|r| parse_u64(&r[..end - 3])) {
                let total = end + 2 + n as usize + 2;
                if buf.len() >= total {
                    return Ok(buf);
                }
            } else {
                return Ok(buf);
            }
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            bail!("server closed the connection");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = memchr::memchr(b'\n', &buf[from..]) {
        let i = from + i;
        if i > 0 && buf[i - 1] == b'\r' {
            return Some(i - 1);
        }
        from = i + 1;
    }
    None
}

fn parse_u64(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for &b in s {
        if !b.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(v)
}

/// Reads `key: value` from a `stats` YAML body.
fn stats_field(yaml: &[u8], key: &str) -> Option<u64> {
    let text = String::from_utf8_lossy(yaml);
    text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(": ")?.trim().parse().ok())
}

fn connect_std(addr: &str) -> Result<std::net::TcpStream> {
    let s = std::net::TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Connects and runs one command until the server answers, or `timeout` passes.
fn ping(addr: &str, timeout: Duration) -> Result<Vec<u8>> {
    let start = Instant::now();
    loop {
        let attempt = (|| -> Result<Vec<u8>> {
            let mut s = connect_std(addr)?;
            s.set_read_timeout(Some(timeout.saturating_sub(start.elapsed()).max(Duration::from_millis(1))))?;
            sync_cmd(&mut s, b"stats\r\n")
        })();
        match attempt {
            Ok(reply) if reply.starts_with(b"OK ") => return Ok(reply),
            Ok(reply) => bail!("unexpected reply to stats: {:?}", String::from_utf8_lossy(&reply)),
            Err(e) if start.elapsed() >= timeout => {
                return Err(e.context(format!("no answer from {addr} within {timeout:?}")))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

fn free_port() -> Result<()> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    println!("{}", l.local_addr()?.port());
    Ok(())
}

/// Opens `k` connections and has each answer one command, so the server has
/// certainly accepted them. Done in batches to stay within the listen backlog.
fn open_idle(addr: &str, k: usize) -> Result<Vec<std::net::TcpStream>> {
    let mut all = Vec::with_capacity(k);
    while all.len() < k {
        let batch = (k - all.len()).min(200);
        let mut fresh = Vec::with_capacity(batch);
        for _ in 0..batch {
            let s = connect_std(addr)
                .with_context(|| format!("opening idle connection {} of {k}", all.len() + fresh.len() + 1))?;
            fresh.push(s);
        }
        for s in &mut fresh {
            s.write_all(b"list-tube-used\r\n")?;
        }
        for s in &mut fresh {
            let r = read_one_reply(s)?;
            if !r.starts_with(b"USING ") {
                bail!("idle connection got {:?}", String::from_utf8_lossy(&r));
            }
        }
        all.append(&mut fresh);
    }
    Ok(all)
}

// ----- the load loop --------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Put,
    Drain,
    Pipeline,
    Latency,
    Fill,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Put => "put",
            Mode::Drain => "drain",
            Mode::Pipeline => "pipeline",
            Mode::Latency => "latency",
            Mode::Fill => "fill",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    Put,
    Reserve,
    Delete,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Producer,
    Consumer,
}

struct Conn {
    stream: TcpStream,
    role: Role,
    out: Vec<u8>,
    out_pos: usize,
    inbuf: Vec<u8>,
    in_start: usize,
    in_end: usize,
    expect: VecDeque<Expect>,
    puts_out: usize,
    reserves_out: usize,
    writable: bool,
}

/// Counters of one run.
#[derive(Default, Clone, Copy, Debug)]
struct Counts {
    puts_sent: u64,
    puts_acked: u64,
    reserves_sent: u64,
    reserved: u64,
    deleted: u64,
    errors: u64,
}

/// A point in time with the counters and CPU clocks read there.
#[derive(Clone, Copy)]
struct Mark {
    at: Instant,
    counts: Counts,
    server_cpu: Option<f64>,
    client_cpu: f64,
}

struct Load {
    mode: Mode,
    args: LoadArgs,
    conns: Vec<Conn>,
    counts: Counts,
    first_error: Option<String>,
    /// Latency samples (nanoseconds), kept while measuring.
    samples: Vec<u64>,
    measuring: bool,
    stopping: bool,
    /// drain: reserves that may still be sent.
    reserve_budget: u64,
    /// fill: puts that may still be sent.
    put_budget: u64,
    epoch: Instant,
    put_header: Vec<u8>,
    filler: Vec<u8>,
    rr: usize,
}

const READ_BUF: usize = 256 * 1024;

impl Load {
    fn mark(&self) -> Mark {
        Mark {
            at: Instant::now(),
            counts: self.counts,
            server_cpu: self.args.pid.and_then(proc_cpu_secs),
            client_cpu: self_cpu_secs(),
        }
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    fn push_put(&mut self, i: usize) {
        let stamp = if self.mode == Mode::Latency { Some(self.now_ns()) } else { None };
        let c = &mut self.conns[i];
        c.out.extend_from_slice(&self.put_header);
        match stamp {
            Some(ns) => {
                c.out.extend_from_slice(format!("{ns:020}").as_bytes());
                c.out.extend_from_slice(&self.filler[20..]);
            }
            None => c.out.extend_from_slice(&self.filler),
        }
        c.out.extend_from_slice(b"\r\n");
        c.expect.push_back(Expect::Put);
        c.puts_out += 1;
        self.counts.puts_sent += 1;
    }

    fn push_reserve(&mut self, i: usize) {
        let c = &mut self.conns[i];
        c.out.extend_from_slice(b"reserve\r\n");
        c.expect.push_back(Expect::Reserve);
        c.reserves_out += 1;
        self.counts.reserves_sent += 1;
    }

    /// Queues as many commands on connection `i` as the mode allows.
    fn refill(&mut self, i: usize) {
        let depth = self.args.depth;
        match self.conns[i].role {
            Role::Producer => loop {
                if self.stopping || self.conns[i].puts_out >= depth {
                    return;
                }
                match self.mode {
                    Mode::Put => {}
                    Mode::Fill => {
                        if self.put_budget == 0 {
                            return;
                        }
                        self.put_budget -= 1;
                    }
                    Mode::Pipeline => {
                        if self.counts.puts_sent.saturating_sub(self.counts.reserved) >= self.args.max_backlog {
                            return;
                        }
                    }
                    // Paced in `pace`.
                    Mode::Latency | Mode::Drain => return,
                }
                self.push_put(i);
            },
            Role::Consumer => loop {
                if self.stopping || self.conns[i].reserves_out >= self.args.reserve_depth.unwrap_or(depth) {
                    return;
                }
                if self.mode == Mode::Drain {
                    if self.reserve_budget == 0 {
                        return;
                    }
                    self.reserve_budget -= 1;
                }
                self.push_reserve(i);
            },
        }
    }

    /// latency: sends the puts that are due by now, round-robin over producers.
    fn pace(&mut self, since: Instant) {
        if self.stopping {
            return;
        }
        let due = (since.elapsed().as_secs_f64() * self.args.rate) as u64;
        let producers: Vec<usize> = (0..self.conns.len()).filter(|&i| self.conns[i].role == Role::Producer).collect();
        let mut blocked = 0;
        while self.counts.puts_sent < due && blocked < producers.len() {
            let i = producers[self.rr % producers.len()];
            self.rr += 1;
            if self.conns[i].puts_out >= self.args.depth {
                blocked += 1;
                continue;
            }
            blocked = 0;
            self.push_put(i);
        }
    }

    fn flush(&mut self, i: usize) -> Result<()> {
        let c = &mut self.conns[i];
        while c.writable && c.out_pos < c.out.len() {
            match c.stream.write(&c.out[c.out_pos..]) {
                Ok(0) => bail!("server closed the connection"),
                Ok(n) => c.out_pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => c.writable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("writing to the server"),
            }
        }
        if c.out_pos == c.out.len() {
            c.out.clear();
            c.out_pos = 0;
        }
        Ok(())
    }

    /// Reads everything the socket holds and handles the complete replies.
    fn read(&mut self, i: usize) -> Result<()> {
        loop {
            let c = &mut self.conns[i];
            if c.in_end == c.inbuf.len() {
                if c.in_start > 0 {
                    c.inbuf.copy_within(c.in_start..c.in_end, 0);
                    c.in_end -= c.in_start;
                    c.in_start = 0;
                } else {
                    let n = c.inbuf.len() * 2;
                    c.inbuf.resize(n, 0);
                }
            }
            let end = c.in_end;
            match c.stream.read(&mut c.inbuf[end..]) {
                Ok(0) => bail!("the server closed the connection (did it die?)"),
                Ok(n) => {
                    c.in_end += n;
                    self.handle_replies(i)?;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("reading from the server (did it die?)"),
            }
        }
    }

    fn error(&mut self, what: &str, reply: &[u8]) {
        self.counts.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(format!("{what}: {:?}", String::from_utf8_lossy(reply)));
        }
    }

    fn handle_replies(&mut self, i: usize) -> Result<()> {
        loop {
            let c = &mut self.conns[i];
            let buf = &c.inbuf[c.in_start..c.in_end];
            let Some(line_end) = find_crlf(buf) else { break };
            let Some(&expect) = c.expect.front() else {
                bail!("unsolicited reply {:?}", String::from_utf8_lossy(&buf[..line_end]));
            };
            let line = &buf[..line_end];
            let mut consumed = line_end + 2;
            match expect {
                Expect::Put => {
                    c.puts_out -= 1;
                    if line.starts_with(b"INSERTED ") {
                        self.counts.puts_acked += 1;
                    } else {
                        let line = line.to_vec();
                        self.error("put", &line);
                    }
                }
                Expect::Delete => {
                    if line == b"DELETED" {
                        self.counts.deleted += 1;
                    } else {
                        let line = line.to_vec();
                        self.error("delete", &line);
                    }
                }
                Expect::Reserve => {
                    if let Some(rest) = line.strip_prefix(b"RESERVED ") {
                        let mut parts = rest.split(|&b| b == b' ');
                        let id = parts.next().and_then(parse_u64);
                        let len = parts.next().and_then(parse_u64);
                        let (Some(id), Some(len)) = (id, len) else {
                            bail!("bad reserve reply {:?}", String::from_utf8_lossy(line));
                        };
                        let frame = consumed + len as usize + 2;
                        if buf.len() < frame {
                            // Wait for the body; make sure it fits.
                            if c.inbuf.len() < frame {
                                c.inbuf.resize(frame.next_power_of_two(), 0);
                            }
                            break;
                        }
                        let stamp = if self.mode == Mode::Latency && len >= 20 {
                            parse_u64(&buf[consumed..consumed + 20])
                        } else {
                            None
                        };
                        consumed = frame;
                        c.reserves_out -= 1;
                        c.out.extend_from_slice(polaris_proto::ReplyLine::number(b"delete ", id).as_bytes());
                        c.expect.push_back(Expect::Delete);
                        self.counts.reserved += 1;
                        if let (Some(ts), true) = (stamp, self.measuring) {
                            let now = self.epoch.elapsed().as_nanos() as u64;
                            self.samples.push(now.saturating_sub(ts));
                        }
                    } else {
                        c.reserves_out -= 1;
                        let line = line.to_vec();
                        self.error("reserve", &line);
                    }
                }
            }
            let c = &mut self.conns[i];
            c.expect.pop_front();
            c.in_start += consumed;
            if c.in_start == c.in_end {
                c.in_start = 0;
                c.in_end = 0;
            }
        }
        // New room: queue more commands and send them.
        self.refill(i);
        self.flush(i)
    }
}

fn tube_name(i: usize) -> String {
    format!("bench{i}")
}

fn run_load(mode: Mode, args: LoadArgs) -> Result<()> {
    if mode == Mode::Latency && args.size < 20 {
        bail!("latency needs --size of at least 20 (the body carries a timestamp)");
    }
    if args.depth == 0 || args.conns == 0 || args.tubes == 0 {
        bail!("--depth, --conns and --tubes must be at least 1");
    }
    let nofile = raise_nofile();
    if args.idle > 0 && (args.idle + args.conns + 64) as u64 > nofile {
        bail!("--idle {} needs more open files than the limit of {nofile}; raise `ulimit -n`", args.idle);
    }
    let (producers, consumers) = match mode {
        Mode::Put | Mode::Fill => (args.conns, 0),
        Mode::Drain => (0, args.conns),
        Mode::Pipeline | Mode::Latency => {
            let p = args.producers.unwrap_or((args.conns / 2).max(1));
            let c = args.consumers.unwrap_or(args.conns.saturating_sub(p).max(1));
            (p, c)
        }
    };
    let rss_before = args.pid.and_then(proc_rss_kb);
    let idle = if args.idle > 0 { open_idle(&args.addr, args.idle)? } else { Vec::new() };

    // Set up the connections with blocking I/O, then hand them to the poll loop.
    let multi = args.tubes > 1;
    let mut ready_jobs = None;
    let mut poll = Poll::new()?;
    let mut conns = Vec::new();
    for n in 0..producers + consumers {
        let role = if n < producers { Role::Producer } else { Role::Consumer };
        let tube = if role == Role::Producer { n % args.tubes } else { 0 };
        let mut s = connect_std(&args.addr)?;
        if multi {
            match role {
                Role::Producer => {
                    let r = sync_cmd(&mut s, format!("use {}\r\n", tube_name(tube)).as_bytes())?;
                    if !r.starts_with(b"USING ") {
                        bail!("use failed: {:?}", String::from_utf8_lossy(&r));
                    }
                }
                Role::Consumer => {
                    for t in 0..args.tubes {
                        let r = sync_cmd(&mut s, format!("watch {}\r\n", tube_name(t)).as_bytes())?;
                        if !r.starts_with(b"WATCHING ") {
                            bail!("watch failed: {:?}", String::from_utf8_lossy(&r));
                        }
                    }
                    let r = sync_cmd(&mut s, b"ignore default\r\n")?;
                    if !r.starts_with(b"WATCHING ") {
                        bail!("ignore failed: {:?}", String::from_utf8_lossy(&r));
                    }
                }
            }
        }
        if mode == Mode::Drain && ready_jobs.is_none() {
            let r = sync_cmd(&mut s, b"stats\r\n")?;
            ready_jobs = Some(stats_field(&r, "current-jobs-ready").context("stats has no current-jobs-ready")?);
        }
        s.set_nonblocking(true)?;
        let mut stream = TcpStream::from_std(s);
        poll.registry().register(&mut stream, Token(n), Interest::READABLE | Interest::WRITABLE)?;
        conns.push(Conn {
            stream,
            role,
            out: Vec::with_capacity(64 * 1024),
            out_pos: 0,
            inbuf: vec![0; READ_BUF],
            in_start: 0,
            in_end: 0,
            expect: VecDeque::with_capacity(args.depth * 2 + 4),
            puts_out: 0,
            reserves_out: 0,
            writable: true,
        });
    }

    let reserve_budget = match mode {
        Mode::Drain => {
            let ready = ready_jobs.unwrap_or(0);
            args.jobs.map_or(ready, |j| j.min(ready))
        }
        _ => 0,
    };
    let put_budget = if mode == Mode::Fill { args.jobs.context("fill needs --jobs")? } else { 0 };
    let put_header = format!("put {} 0 {} {}\r\n", args.pri, args.ttr, args.size).into_bytes();
    let mut load = Load {
        mode,
        args: args.clone(),
        conns,
        counts: Counts::default(),
        first_error: None,
        samples: Vec::new(),
        measuring: false,
        stopping: false,
        reserve_budget,
        put_budget,
        epoch: Instant::now(),
        put_header,
        filler: vec![b'x'; args.size],
        rr: 0,
    };

    let timed = matches!(mode, Mode::Put | Mode::Pipeline | Mode::Latency);
    let start = Instant::now();
    let warmup = if timed { Duration::from_secs_f64(args.warmup) } else { Duration::ZERO };
    let duration = Duration::from_secs_f64(args.duration);
    let hard_stop = start + warmup + duration + Duration::from_secs_f64(args.timeout);
    let mut begin: Option<Mark> = None;
    let mut end: Option<Mark> = None;
    if !timed {
        load.measuring = true;
        begin = Some(load.mark());
    }
    let mut events = Events::with_capacity(1024);
    loop {
        let now = Instant::now();
        if timed && begin.is_none() && now >= start + warmup {
            load.measuring = true;
            load.samples.clear();
            begin = Some(load.mark());
        }
        if let Some(b) = begin {
            let finished = match mode {
                Mode::Put | Mode::Pipeline | Mode::Latency => now >= b.at + duration,
                Mode::Drain => load.counts.deleted >= reserve_budget || now >= b.at + duration,
                Mode::Fill => load.counts.puts_acked + load.counts.errors >= put_budget,
            };
            if finished && end.is_none() {
                end = Some(load.mark());
                load.measuring = false;
                load.stopping = true;
            }
        }
        if end.is_some() {
            // put: let the puts in flight land so the job count is exact for what follows.
            let in_flight: usize = load.conns.iter().map(|c| c.puts_out).sum();
            if mode != Mode::Put || in_flight == 0 {
                break;
            }
        }
        if now >= hard_stop {
            bail!(
                "{} run did not finish within its timeout ({} jobs done)",
                mode.name(),
                load.counts.puts_acked.max(load.counts.deleted)
            );
        }
        if mode == Mode::Latency {
            load.pace(start);
        }
        for i in 0..load.conns.len() {
            load.refill(i);
            load.flush(i)?;
        }
        let timeout = if mode == Mode::Latency { Duration::from_micros(500) } else { Duration::from_millis(5) };
        match poll.poll(&mut events, Some(timeout)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
        for ev in events.iter() {
            let i = ev.token().0;
            if ev.is_writable() {
                load.conns[i].writable = true;
                load.flush(i)?;
            }
            if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                load.read(i)?;
            }
        }
    }
    let (b, e) = (begin.expect("measured"), end.expect("measured"));
    let secs = (e.at - b.at).as_secs_f64().max(1e-9);
    let jobs = match mode {
        Mode::Put | Mode::Fill => e.counts.puts_acked - b.counts.puts_acked,
        Mode::Drain | Mode::Pipeline | Mode::Latency => e.counts.deleted - b.counts.deleted,
    };
    let server_cpu = match (b.server_cpu, e.server_cpu) {
        (Some(x), Some(y)) => Some(y - x),
        _ => None,
    };
    let mut rec = Record {
        scenario: args.scenario.clone().unwrap_or_else(|| mode.name().to_string()),
        config: args.config.clone(),
        server: args.server.clone(),
        mode: mode.name().into(),
        producers,
        consumers,
        depth: args.depth,
        reserve_depth: if consumers > 0 { args.reserve_depth.unwrap_or(args.depth) } else { 0 },
        size: args.size,
        tubes: args.tubes,
        idle: idle.len(),
        jobs,
        secs,
        jobs_per_s: jobs as f64 / secs,
        server_cpu_s: server_cpu,
        server_cpu_us_per_job: server_cpu.filter(|_| jobs > 0).map(|c| c * 1e6 / jobs as f64),
        client_cpu_s: e.client_cpu - b.client_cpu,
        rss_kb: args.pid.and_then(proc_rss_kb),
        rss_before_kb: rss_before,
        errors: load.counts.errors,
        ..Record::default()
    };
    if mode == Mode::Latency {
        let mut s = std::mem::take(&mut load.samples);
        s.sort_unstable();
        let pct = |q: f64| -> Option<f64> {
            if s.is_empty() {
                return None;
            }
            let idx = ((q * s.len() as f64) as usize).min(s.len() - 1);
            Some(s[idx] as f64 / 1e3)
        };
        rec.samples = Some(s.len() as u64);
        rec.p50_us = pct(0.50);
        rec.p99_us = pct(0.99);
        rec.p999_us = pct(0.999);
        rec.max_us = s.last().map(|&v| v as f64 / 1e3);
    }
    drop(idle);
    emit(&rec, args.out.as_ref())?;
    if let Some(err) = load.first_error {
        bail!("{} unexpected replies, the first: {err}", load.counts.errors);
    }
    Ok(())
}

fn emit(rec: &Record, out: Option<&PathBuf>) -> Result<()> {
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

// ----- restart ------------------------------------------------------------------------

fn run_restart(args: RestartArgs) -> Result<()> {
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    let timeout = Duration::from_secs_f64(args.timeout);
    let mut cmd = Command::new(&args.command[0]);
    cmd.args(&args.command[1..]).stdin(Stdio::null()).stdout(Stdio::null());
    // SAFETY: prctl is async-signal-safe; the child dies with us.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    let t0 = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("spawning {:?}", args.command))?;
    let pid = child.id();
    let answered = ping(&args.addr, timeout);
    let restart_s = t0.elapsed().as_secs_f64();
    let stop = |child: &mut std::process::Child| {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
    };
    let reply = match answered {
        Ok(r) => r,
        Err(e) => {
            let status = child.try_wait().ok().flatten();
            stop(&mut child);
            return Err(e.context(format!("server exit status: {status:?}")));
        }
    };
    let cpu = proc_cpu_secs(pid);
    let rss = proc_rss_kb(pid);
    stop(&mut child);
    let jobs: u64 = ["current-jobs-ready", "current-jobs-delayed", "current-jobs-buried", "current-jobs-reserved"]
        .iter()
        .filter_map(|k| stats_field(&reply, k))
        .sum();
    let rec = Record {
        scenario: args.scenario.clone(),
        config: args.config.clone(),
        server: args.server.clone(),
        mode: "restart".into(),
        jobs,
        secs: restart_s,
        restart_s: Some(restart_s),
        server_cpu_s: cpu,
        rss_kb: rss,
        ..Record::default()
    };
    emit(&rec, args.out.as_ref())?;
    if let Some(want) = args.expect_jobs {
        if jobs != want {
            bail!("restarted server holds {jobs} jobs, expected {want}");
        }
    }
    Ok(())
}

// ----- report -------------------------------------------------------------------------

/// Lower or higher is better.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Better {
    Higher,
    Lower,
    /// Context, not a score (e.g. how busy a process was).
    Info,
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let n = v.len();
    Some(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
}

fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{:.0}", v)
    } else if a >= 10.0 {
        format!("{:.1}", v)
    } else {
        format!("{:.2}", v)
    }
}

type Metric = (&'static str, &'static str, Better, fn(&Record) -> Option<f64>);

const METRICS: &[Metric] = &[
    ("throughput", "jobs/s", Better::Higher, |r| {
        (r.mode != "restart" && r.mode != "fill" && r.jobs > 0).then_some(r.jobs_per_s)
    }),
    ("server CPU per job", "µs", Better::Lower, |r| {
        if r.mode == "restart" || r.mode == "fill" {
            None
        } else {
            r.server_cpu_us_per_job
        }
    }),
    ("server CPU use", "cores", Better::Info, |r| {
        if r.mode == "restart" || r.mode == "fill" {
            None
        } else {
            r.server_cpu_s.map(|c| c / r.secs)
        }
    }),
    ("load generator CPU use", "cores", Better::Info, |r| {
        if r.mode == "restart" || r.mode == "fill" {
            None
        } else {
            Some(r.client_cpu_s / r.secs)
        }
    }),
    ("p50 put→reserve", "µs", Better::Lower, |r| r.p50_us),
    ("p99 put→reserve", "µs", Better::Lower, |r| r.p99_us),
    ("p99.9 put→reserve", "µs", Better::Lower, |r| r.p999_us),
    ("RSS", "MiB", Better::Lower, |r| if r.mode == "fill" { r.rss_kb.map(|k| k as f64 / 1024.0) } else { None }),
    ("fill throughput", "jobs/s", Better::Higher, |r| (r.mode == "fill").then_some(r.jobs_per_s)),
    ("restart time", "s", Better::Lower, |r| r.restart_s),
    ("RSS after restart", "MiB", Better::Lower, |r| {
        if r.mode == "restart" {
            r.rss_kb.map(|k| k as f64 / 1024.0)
        } else {
            None
        }
    }),
];

/// The targets of the issue: (scenario, config, metric, goal ratio, description).
const TARGETS: &[(&str, &str, &str, f64, &str)] = &[
    ("pipeline", "mem", "throughput", 1.5, "in-memory concurrent throughput ≥ 1.5×"),
    ("pipeline", "mem", "server CPU per job", 0.6, "server CPU time per operation ≤ 0.6× (concurrent, in memory)"),
    ("sync", "mem", "throughput", 1.5, "the same without pipelining (depth 1): in-memory concurrent throughput ≥ 1.5×"),
    (
        "sync",
        "mem",
        "server CPU per job",
        0.6,
        "the same without pipelining (depth 1): server CPU per operation ≤ 0.6×",
    ),
    ("pipeline", "durable", "throughput", 2.5, "durable, default fsync: concurrent throughput ≥ 2.5×"),
    (
        "pipeline",
        "fsync-always",
        "throughput",
        10.0,
        "durable, fsync before every ack (-f 0): concurrent throughput ≥ 10×",
    ),
    ("latency", "mem", "p99 put→reserve", 0.75, "p99 put-to-reserve latency ≤ 0.75× (in memory)"),
    ("fill", "mem", "RSS", 0.8, "RSS with 1,000,000 jobs of 100 bytes ≤ 0.8× (in memory)"),
];

fn report(args: &ReportArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.input).with_context(|| format!("reading {}", args.input.display()))?;
    let mut records = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let r: Record = serde_json::from_str(line).with_context(|| format!("{}:{}", args.input.display(), n + 1))?;
        records.push(r);
    }
    // Keep the scenario order of the file.
    let mut order: Vec<(String, String)> = Vec::new();
    let mut groups: BTreeMap<(String, String), Vec<&Record>> = BTreeMap::new();
    for r in &records {
        let key = (r.scenario.clone(), r.config.clone());
        if !groups.contains_key(&key) {
            order.push(key.clone());
        }
        groups.entry(key).or_default().push(r);
    }
    let (base, cand) = (&args.baseline, &args.candidate);
    let mut md = String::new();
    md.push_str(&format!(
        "| scenario | config | metric | {base} | {cand} | ratio {cand}/{base} | better |\n|---|---|---|---:|---:|---:|---|\n"
    ));
    // (scenario, config, metric) -> (base, cand, ratio)
    let mut ratios: BTreeMap<(String, String, String), (f64, f64, f64)> = BTreeMap::new();
    let mut errors = 0;
    for key in &order {
        let rs = &groups[key];
        errors += rs.iter().map(|r| r.errors).sum::<u64>();
        for &(name, unit, better, get) in METRICS {
            let of = |server: &str| median(rs.iter().filter(|r| r.server == server).filter_map(|r| get(r)).collect());
            let (b, c) = (of(base), of(cand));
            if b.is_none() && c.is_none() {
                continue;
            }
            let ratio = match (b, c) {
                (Some(b), Some(c)) if b > 0.0 && better != Better::Info => Some(c / b),
                _ => None,
            };
            if let (Some(b), Some(c), Some(r)) = (b, c, ratio) {
                ratios.insert((key.0.clone(), key.1.clone(), name.to_string()), (b, c, r));
            }
            let show = |v: Option<f64>| v.map_or("–".to_string(), fmt_num);
            md.push_str(&format!(
                "| {} | {} | {name} ({unit}) | {} | {} | {} | {} |\n",
                key.0,
                key.1,
                show(b),
                show(c),
                ratio.map_or("–".into(), |r| format!("{r:.2}×")),
                match better {
                    Better::Higher => "higher",
                    Better::Lower => "lower",
                    Better::Info => "(context)",
                }
            ));
        }
    }
    md.push_str("\n| target | goal | measured | met |\n|---|---:|---:|---|\n");
    for &(scenario, config, metric, goal, desc) in TARGETS {
        let got = ratios.get(&(scenario.to_string(), config.to_string(), metric.to_string()));
        let better = METRICS.iter().find(|m| m.0 == metric).map_or(Better::Higher, |m| m.2);
        let (measured, met) = match got {
            Some(&(_, _, r)) => (format!("{r:.2}×"), if better == Better::Higher { r >= goal } else { r <= goal }),
            None => ("not measured".into(), false),
        };
        md.push_str(&format!("| {desc} | {goal}× | {measured} | {} |\n", if met { "yes" } else { "**no**" }));
    }
    let restart = records.iter().filter(|r| r.server == *cand).filter_map(|r| r.restart_s).collect::<Vec<_>>();
    match median(restart) {
        Some(s) => md.push_str(&format!(
            "| restart of {cand} with 1,000,000 jobs on disk ≤ 3 s | 3 s | {s:.2} s | {} |\n",
            if s <= 3.0 { "yes" } else { "**no**" }
        )),
        None => md.push_str(&format!(
            "| restart of {cand} with 1,000,000 jobs on disk ≤ 3 s | 3 s | not measured | **no** |\n"
        )),
    }
    if errors > 0 {
        md.push_str(&format!("\n**{errors} unexpected replies were recorded; see the raw results.**\n"));
    }
    print!("{md}");
    if let Some(path) = &args.md {
        std::fs::write(path, &md).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crlf_and_numbers() {
        assert_eq!(find_crlf(b"INSERTED 5\r\n"), Some(10));
        assert_eq!(find_crlf(b"a\nb\r\n"), Some(3));
        assert_eq!(find_crlf(b"abc\r"), None);
        assert_eq!(parse_u64(b"00000000000000001234"), Some(1234));
        assert_eq!(parse_u64(b"99999999999999999999"), None);
        assert_eq!(parse_u64(b"1234"), Some(1234));
        assert_eq!(
            stats_field(b"---\ncurrent-jobs-urgent: 1\ncurrent-jobs-ready: 42\n", "current-jobs-ready"),
            Some(42)
        );
    }

    #[test]
    fn median_of_rounds() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
    }
}
