//! Simulated agents: many hosts in one process, each a real queue connection that watches
//! `host.<id>` (not `default`), reserves, and answers each envelope as polaris-agent does
//! ([`crate::answer`]): after the command time, `use <reply tube>`, `put` the signed
//! result, `delete` the queue job, reserve again.
//!
//! Connections are set up one by one with blocking I/O (`watch`, `ignore`: a queue that
//! refuses is found out before anything is measured), then shared out over `--threads`
//! event loops, each driving its connections through one `mio` poll. Commands of one
//! answer go out in one write. Reserves are `reserve-with-timeout 1`, as polaris-agent's
//! serve loop sends them, so an idle fleet costs the queue what a real one does
//! (`--reserve-timeout 0`: plain `reserve`, no idle traffic).

use crate::answer::{self, Decision};
use crate::blocking::{connect_std, sync_cmd};
use crate::reply::{find_crlf, parse_u64};
use anyhow::{bail, Context, Result};
use mio::{Events, Interest, Poll, Token};
use polaris_ops_wire::wire::{self, host_tube, JobEnvelope, Secret};
use polaris_proto::reply;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Longest poll wait: how soon a loop notices it is asked to stop.
const MAX_WAIT: Duration = Duration::from_millis(100);
/// Bytes read from a socket at a time.
const READ_CHUNK: usize = 64 * 1024;

/// How the simulated agents behave.
#[derive(Debug, Clone)]
pub(crate) struct Behaviour {
    /// How long each command takes.
    pub command: Duration,
    /// Up to this much more, uniformly at random.
    pub jitter: Duration,
    /// The share of commands that exit 1 instead of 0.
    pub failure_rate: f64,
    /// Bytes of output each command prints.
    pub output_bytes: usize,
    /// `reserve-with-timeout` seconds; 0 sends plain `reserve`.
    pub reserve_timeout: u32,
}

/// One simulated host: its id and the queue (shard) its agent connects to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SimHost {
    /// The host id (`sim-00001`).
    pub id: String,
    /// `HOST:PORT` of its queue.
    pub queue: String,
}

/// What the simulated agents did, shared by every loop.
#[derive(Default, Debug)]
pub(crate) struct Counters {
    /// Envelopes taken to run.
    pub reserved: AtomicU64,
    /// Results the queue accepted (`INSERTED`).
    pub answered: AtomicU64,
    /// Of the commands run, those that exited non-zero.
    pub nonzero: AtomicU64,
    /// Envelopes refused (bad signature, wrong host, expired) and unexpected replies.
    pub errors: AtomicU64,
    /// The first of those, said in words.
    first_error: Mutex<Option<String>>,
}

impl Counters {
    fn error(&self, what: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_error.lock().unwrap_or_else(|p| p.into_inner());
        first.get_or_insert(what);
    }

    /// The first error, if any was counted.
    pub(crate) fn first_error(&self) -> Option<String> {
        self.first_error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The running simulated fleet: its event-loop threads.
pub(crate) struct Fleet {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Result<()>>>,
    /// What the agents did so far.
    pub counters: Arc<Counters>,
}

impl Fleet {
    /// Connects every host's agent to its queue (watching its tube), then starts
    /// `threads` event loops serving them.
    pub(crate) fn start(hosts: &[SimHost], secret: &Secret, behaviour: &Behaviour, threads: usize) -> Result<Fleet> {
        let threads = threads.clamp(1, hosts.len().max(1));
        let mut shares: Vec<Vec<Agent>> = (0..threads).map(|_| Vec::new()).collect();
        for (n, host) in hosts.iter().enumerate() {
            let stream = connect_agent(host).with_context(|| {
                format!("connecting the agent of host {} ({} of {}) to {}", host.id, n + 1, hosts.len(), host.queue)
            })?;
            shares[n % threads].push(Agent::new(stream, host.id.clone()));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let mut handles = Vec::with_capacity(threads);
        for (t, agents) in shares.into_iter().enumerate() {
            let mut event_loop = EventLoop {
                agents,
                secret: secret.clone(),
                behaviour: behaviour.clone(),
                counters: counters.clone(),
                stop: stop.clone(),
                timers: BinaryHeap::new(),
                rng: SplitMix(0x9E37_79B9_7F4A_7C15 ^ (t as u64 + 1).wrapping_mul(wire::unix_now_ms() as u64)),
                reserve: reserve_command(behaviour.reserve_timeout),
            };
            let handle = std::thread::Builder::new()
                .name(format!("sim-{t}"))
                .spawn(move || event_loop.run())
                .context("starting a simulator thread")?;
            handles.push(handle);
        }
        Ok(Fleet { stop, threads: handles, counters })
    }

    /// Fails if a loop ended (a queue closed a connection, the poll failed).
    pub(crate) fn check(&mut self) -> Result<()> {
        if let Some(done) = self.threads.iter().position(|t| t.is_finished()) {
            let handle = self.threads.swap_remove(done);
            return match handle.join() {
                Ok(Ok(())) => bail!("a simulator loop stopped by itself"),
                Ok(Err(e)) => Err(e.context("a simulator loop failed")),
                Err(_) => bail!("a simulator loop panicked"),
            };
        }
        Ok(())
    }

    /// Stops the loops and waits for them.
    pub(crate) fn stop(mut self) -> Result<()> {
        self.check()?;
        self.stop.store(true, Ordering::SeqCst);
        for handle in self.threads.drain(..) {
            match handle.join() {
                Ok(result) => result?,
                Err(_) => bail!("a simulator loop panicked"),
            }
        }
        Ok(())
    }
}

/// A connection that watches the host's tube and nothing else, as the agent's.
fn connect_agent(host: &SimHost) -> Result<std::net::TcpStream> {
    let mut stream = connect_std(&host.queue)?;
    for command in [format!("watch {}\r\n", host_tube(&host.id)), "ignore default\r\n".to_string()] {
        let reply = sync_cmd(&mut stream, command.as_bytes())?;
        if !reply.starts_with(reply::WATCHING_PREFIX) {
            bail!("{:?} answered {:?}", command.trim_end(), String::from_utf8_lossy(&reply));
        }
    }
    // The event loop's reads and writes must never block.
    stream.set_nonblocking(true)?;
    Ok(stream)
}

fn reserve_command(timeout: u32) -> Vec<u8> {
    match timeout {
        0 => b"reserve\r\n".to_vec(),
        t => format!("reserve-with-timeout {t}\r\n").into_bytes(),
    }
}

/// The reply a command sent waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    Reserve,
    Use,
    Put,
    Delete,
    Bury,
}

impl Expect {
    fn name(self) -> &'static str {
        match self {
            Expect::Reserve => "reserve",
            Expect::Use => "use",
            Expect::Put => "put",
            Expect::Delete => "delete",
            Expect::Bury => "bury",
        }
    }
}

/// The envelope an agent runs now.
struct Running {
    queue_job: u64,
    envelope: Box<JobEnvelope>,
}

/// One simulated agent's connection.
struct Agent {
    stream: mio::net::TcpStream,
    host: String,
    out: Vec<u8>,
    out_pos: usize,
    writable: bool,
    inbuf: Vec<u8>,
    expect: VecDeque<Expect>,
    running: Option<Running>,
}

impl Agent {
    fn new(stream: std::net::TcpStream, host: String) -> Agent {
        Agent {
            stream: mio::net::TcpStream::from_std(stream),
            host,
            out: Vec::new(),
            out_pos: 0,
            writable: true,
            inbuf: Vec::new(),
            expect: VecDeque::with_capacity(4),
            running: None,
        }
    }

    fn send(&mut self, bytes: &[u8], expect: &[Expect]) {
        self.out.extend_from_slice(bytes);
        self.expect.extend(expect);
    }
}

/// A small, fast pseudo-random generator (SplitMix64), for jitter and failures.
struct SplitMix(u64);

impl SplitMix {
    /// A number in [0, 1).
    fn unit(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One thread's share of the agents and its poll.
struct EventLoop {
    agents: Vec<Agent>,
    secret: Secret,
    behaviour: Behaviour,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    /// Commands that finish later: when, and whose.
    timers: BinaryHeap<Reverse<(Instant, usize)>>,
    rng: SplitMix,
    reserve: Vec<u8>,
}

impl EventLoop {
    fn run(&mut self) -> Result<()> {
        let mut poll = Poll::new()?;
        for (i, agent) in self.agents.iter_mut().enumerate() {
            agent.stream.set_nodelay(true)?;
            poll.registry().register(&mut agent.stream, Token(i), Interest::READABLE | Interest::WRITABLE)?;
        }
        for i in 0..self.agents.len() {
            self.reserve_next(i);
            self.flush(i)?;
        }
        let mut events = Events::with_capacity(1024);
        let mut chunk = vec![0u8; READ_CHUNK];
        while !self.stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            while let Some(&Reverse((due, i))) = self.timers.peek() {
                if due > now {
                    break;
                }
                self.timers.pop();
                self.answer(i)?;
                self.flush(i)?;
            }
            let wait = self.timers.peek().map_or(MAX_WAIT, |Reverse((due, _))| due.saturating_duration_since(now));
            match poll.poll(&mut events, Some(wait.min(MAX_WAIT))) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).context("polling the agents' connections"),
            }
            for event in events.iter() {
                let i = event.token().0;
                if event.is_writable() {
                    self.agents[i].writable = true;
                    self.flush(i)?;
                }
                if event.is_readable() || event.is_read_closed() || event.is_error() {
                    self.read(i, &mut chunk)?;
                    self.flush(i)?;
                }
            }
        }
        Ok(())
    }

    fn reserve_next(&mut self, i: usize) {
        let agent = &mut self.agents[i];
        agent.out.extend_from_slice(&self.reserve);
        agent.expect.push_back(Expect::Reserve);
    }

    fn flush(&mut self, i: usize) -> Result<()> {
        let agent = &mut self.agents[i];
        while agent.writable && agent.out_pos < agent.out.len() {
            match agent.stream.write(&agent.out[agent.out_pos..]) {
                Ok(0) => bail!("the queue closed the connection of host {}", agent.host),
                Ok(n) => agent.out_pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => agent.writable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e).with_context(|| format!("writing to the queue for host {}", agent.host)),
            }
        }
        if agent.out_pos == agent.out.len() {
            agent.out.clear();
            agent.out_pos = 0;
        }
        Ok(())
    }

    fn read(&mut self, i: usize, chunk: &mut [u8]) -> Result<()> {
        loop {
            let agent = &mut self.agents[i];
            match agent.stream.read(chunk) {
                Ok(0) => bail!("the queue closed the connection of host {} (did it die?)", agent.host),
                Ok(n) => {
                    agent.inbuf.extend_from_slice(&chunk[..n]);
                    self.handle_replies(i)?;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e).with_context(|| format!("reading from the queue for host {}", agent.host)),
            }
        }
    }

    /// Handles every complete reply buffered for agent `i`.
    fn handle_replies(&mut self, i: usize) -> Result<()> {
        let mut start = 0;
        loop {
            let agent = &mut self.agents[i];
            let buf = &agent.inbuf[start..];
            let Some(line_end) = find_crlf(buf) else { break };
            let Some(expect) = agent.expect.front().copied() else {
                bail!("host {}: unsolicited reply {:?}", agent.host, String::from_utf8_lossy(&buf[..line_end]));
            };
            let line = &buf[..line_end];
            let mut consumed = line_end + 2;
            let mut unexpected = None;
            let mut reserved = None;
            let mut reserve_again = false;
            match expect {
                Expect::Reserve => {
                    if let Some(rest) = line.strip_prefix(reply::RESERVED_PREFIX) {
                        let mut parts = rest.split(|&b| b == b' ');
                        let (Some(id), Some(len)) =
                            (parts.next().and_then(parse_u64), parts.next().and_then(parse_u64))
                        else {
                            bail!("host {}: bad reserve reply {:?}", agent.host, String::from_utf8_lossy(line));
                        };
                        let frame = consumed + len as usize + 2;
                        if buf.len() < frame {
                            break; // the body is still on its way
                        }
                        reserved = Some((id, buf[consumed..frame - 2].to_vec()));
                        consumed = frame;
                    } else if buf[..consumed] == *reply::TIMED_OUT || buf[..consumed] == *reply::DEADLINE_SOON {
                        reserve_again = true;
                    } else {
                        unexpected = Some(line.to_vec());
                        reserve_again = true;
                    }
                }
                Expect::Use => {
                    if !line.starts_with(reply::USING_PREFIX) {
                        unexpected = Some(line.to_vec());
                    }
                }
                Expect::Put => {
                    if line.starts_with(reply::INSERTED_PREFIX) {
                        self.counters.answered.fetch_add(1, Ordering::Relaxed);
                    } else {
                        unexpected = Some(line.to_vec());
                    }
                }
                Expect::Delete => {
                    if buf[..consumed] != *reply::DELETED {
                        unexpected = Some(line.to_vec());
                    }
                }
                Expect::Bury => {
                    if buf[..consumed] != *reply::BURIED {
                        unexpected = Some(line.to_vec());
                    }
                }
            }
            agent.expect.pop_front();
            start += consumed;
            if let Some(line) = unexpected {
                let host = agent.host.clone();
                self.counters.error(format!(
                    "host {host}: unexpected reply to {}: {:?}",
                    expect.name(),
                    String::from_utf8_lossy(&line)
                ));
            }
            if reserve_again {
                self.reserve_next(i);
            }
            if let Some((id, body)) = reserved {
                self.take(i, id, &body)?;
            }
        }
        self.agents[i].inbuf.drain(..start);
        Ok(())
    }

    /// Agent `i` reserved queue job `id`: runs it (answers now or when its command time
    /// is up) or refuses it.
    fn take(&mut self, i: usize, id: u64, body: &[u8]) -> Result<()> {
        match answer::decide(&self.secret, &self.agents[i].host, body, wire::unix_now()) {
            Decision::Run(envelope) => {
                self.counters.reserved.fetch_add(1, Ordering::Relaxed);
                self.agents[i].running = Some(Running { queue_job: id, envelope });
                let b = &self.behaviour;
                let delay = b.command + b.jitter.mul_f64(if b.jitter.is_zero() { 0.0 } else { self.rng.unit() });
                if delay.is_zero() {
                    self.answer(i)?;
                } else {
                    self.timers.push(Reverse((Instant::now() + delay, i)));
                }
            }
            Decision::Refuse { report, why } => {
                let host = self.agents[i].host.clone();
                self.counters.error(format!("host {host}: refused queue job {id}: {why}"));
                let agent = &mut self.agents[i];
                agent.send(&answer::bury_command(id), &[Expect::Bury]);
                if let Some((tube, result)) = report {
                    if polaris_proto::client::is_valid_tube_name(&tube) {
                        agent.send(&answer::put_commands(&self.secret, &tube, &result)?, &[Expect::Use, Expect::Put]);
                    }
                }
                self.reserve_next(i);
            }
        }
        Ok(())
    }

    /// Agent `i`'s command is done: put its result, delete its job, reserve again.
    fn answer(&mut self, i: usize) -> Result<()> {
        let Some(Running { queue_job, envelope }) = self.agents[i].running.take() else { return Ok(()) };
        let exit = u32::from(self.rng.unit() < self.behaviour.failure_rate);
        if exit != 0 {
            self.counters.nonzero.fetch_add(1, Ordering::Relaxed);
        }
        let result = answer::command_result(&envelope, exit, self.behaviour.output_bytes);
        let commands = answer::put_commands(&self.secret, &envelope.reply_tube, &result)?;
        let agent = &mut self.agents[i];
        agent.send(&commands, &[Expect::Use, Expect::Put]);
        agent.send(format!("delete {queue_job}\r\n").as_bytes(), &[Expect::Delete]);
        self.reserve_next(i);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_commands_and_random_units() {
        assert_eq!(reserve_command(0), b"reserve\r\n");
        assert_eq!(reserve_command(1), b"reserve-with-timeout 1\r\n");
        let mut rng = SplitMix(42);
        let draws: Vec<f64> = (0..1000).map(|_| rng.unit()).collect();
        assert!(draws.iter().all(|u| (0.0..1.0).contains(u)));
        let mean = draws.iter().sum::<f64>() / draws.len() as f64;
        assert!((0.4..0.6).contains(&mean), "mean {mean}");
    }
}
