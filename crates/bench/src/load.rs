//! The load loop: one thread drives every connection of a run through one `mio` poll.
//!
//! Connections are set up with blocking I/O (`use`/`watch`, and `stats` for `drain`),
//! then made non-blocking and registered. Each keeps up to `--depth` commands in flight:
//! [`Load::refill`] queues what the mode allows, [`Load::flush`] writes it in one go, and
//! [`Load::read`] takes everything the socket holds and handles every complete reply.
//! The measured window is bounded by two [`Mark`]s, which also read the CPU clocks.

use crate::blocking::{connect_std, open_idle, sync_cmd};
use crate::percentile::percentile;
use crate::procfs::{proc_cpu_secs, proc_rss_kb};
use crate::record::{emit, Record};
use crate::reply::{find_crlf, parse_u64, stats_field};
use crate::{sys, LoadArgs};
use anyhow::{bail, Context, Result};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use polaris_proto::reply;
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

/// What a load run does (one per load subcommand).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
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
            client_cpu: sys::self_cpu_secs(),
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

    /// Handles the complete replies buffered on connection `i`, in place: the line is
    /// framed and its words matched with `polaris_proto`'s scanner and reply constants,
    /// the numbers read without allocating (see [`crate::reply`] for why not the client).
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
                    if line.starts_with(reply::INSERTED_PREFIX) {
                        self.counts.puts_acked += 1;
                    } else {
                        let line = line.to_vec();
                        self.error("put", &line);
                    }
                }
                Expect::Delete => {
                    if buf[..consumed] == *reply::DELETED {
                        self.counts.deleted += 1;
                    } else {
                        let line = line.to_vec();
                        self.error("delete", &line);
                    }
                }
                Expect::Reserve => {
                    if let Some(rest) = line.strip_prefix(reply::RESERVED_PREFIX) {
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

/// polarisd's longest loop turn so far (`polaris-stats`); `None` from a server without the
/// extension (beanstalkd answers `UNKNOWN_COMMAND`) or when asking fails.
fn longest_turn_us(addr: &str) -> Option<f64> {
    let mut s = connect_std(addr).ok()?;
    let reply = sync_cmd(&mut s, b"polaris-stats\r\n").ok()?;
    stats_field(&reply, "longest-turn-us").map(|us| us as f64)
}

fn tube_name(i: usize) -> String {
    format!("bench{i}")
}

/// Runs one load subcommand and emits its [`Record`].
pub(crate) fn run_load(mode: Mode, args: LoadArgs) -> Result<()> {
    if mode == Mode::Latency && args.size < 20 {
        bail!("latency needs --size of at least 20 (the body carries a timestamp)");
    }
    if args.depth == 0 || args.conns == 0 || args.tubes == 0 {
        bail!("--depth, --conns and --tubes must be at least 1");
    }
    let nofile = sys::raise_nofile();
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
                    if !r.starts_with(reply::USING_PREFIX) {
                        bail!("use failed: {:?}", String::from_utf8_lossy(&r));
                    }
                }
                Role::Consumer => {
                    for t in 0..args.tubes {
                        let r = sync_cmd(&mut s, format!("watch {}\r\n", tube_name(t)).as_bytes())?;
                        if !r.starts_with(reply::WATCHING_PREFIX) {
                            bail!("watch failed: {:?}", String::from_utf8_lossy(&r));
                        }
                    }
                    let r = sync_cmd(&mut s, b"ignore default\r\n")?;
                    if !r.starts_with(reply::WATCHING_PREFIX) {
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
        let pct = |q: f64| percentile(&s, q).map(|ns| ns as f64 / 1e3);
        rec.samples = Some(s.len() as u64);
        rec.p50_us = pct(0.50);
        rec.p99_us = pct(0.99);
        rec.p999_us = pct(0.999);
        rec.max_us = s.last().map(|&v| v as f64 / 1e3);
    }
    drop(idle);
    rec.longest_turn_us = longest_turn_us(&args.addr);
    emit(&rec, args.out.as_ref())?;
    if let Some(err) = load.first_error {
        bail!("{} unexpected replies, the first: {err}", load.counts.errors);
    }
    Ok(())
}
