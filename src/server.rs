//! The `mio` event loop: it owns the sockets, feeds decoded commands to the
//! engine, commits each loop turn's changes to the store, and only then
//! flushes the replies (so an acknowledgement is never sent before its data
//! is committed).
//!
//! One loop turn:
//! 1. poll, with the engine's next deadline as the timeout;
//! 2. fire due timers; accept; read every readable socket until `WouldBlock`
//!    and run the complete commands it holds (a connection blocked in
//!    `reserve` runs nothing more until the engine answers it);
//! 3. hand the turn's changes to the store's writer thread (`pipeline.rs`), which commits
//!    whatever is waiting in one transaction (group commit) while the loop goes on;
//! 4. write out every connection's replies that are durable: those of in-memory servers at
//!    once, those of turns whose commit the writer reported.
//!
//! In durable mode every reply is marked with the number of its turn ([`Connection::held`]);
//! a turn's replies are written once its batch, and so every batch before it, is durable.
//! A turn that changed nothing still waits for the batches before it, since what it read
//! (a `reserve` of a job put a turn earlier, a `peek`, `stats`) may show their changes.

use crate::metrics::{Metrics, MetricsConfig, StoreView};
use crate::pipeline::{CommitPipeline, Completion, WriterGone};
use crate::store::{Batch, Durability, Store, StoreError};
use crate::sys;
use crate::tls::{TlsSettings, TlsStream};
use anyhow::{bail, Context};
use bytes::{Buf, BytesMut};
use mio::event::Source;
use mio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use mio::{Events, Interest, Poll, Registry, Token};
use polaris_engine::{self as engine, ConnId, Engine, IdHashBuilder, JobId, Nanos, Outcome, ReplySink};
use polaris_proto::{reply, Decoded, Decoder, Limits};
use slab::Slab;
use std::collections::{HashSet, VecDeque};
use std::io::{self, Read, Write};
use std::net::ToSocketAddrs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The engine clock's reading when the process starts. Not zero, so that a job restored
/// from disk keeps its creation time, which lies before the start (its `age` goes on from
/// where it was): a century of nanoseconds leaves room below and, with the largest delay
/// and TTL a client may ask for added on top, still fits in a `u64`.
const CLOCK_ORIGIN: Nanos = 100 * 365 * 24 * 3600 * engine::SECOND;

/// Where to listen.
#[derive(Clone, Debug)]
pub enum Listen {
    /// A TCP address; port 0 picks a free port.
    Tcp {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
    /// A Unix socket path.
    Unix(PathBuf),
}

/// Everything the server needs to run.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Listening address.
    pub listen: Listen,
    /// TLS certificate and key (and client CA): the main listener serves TLS, unless
    /// `tls_listen` names a second listener for it.
    pub tls: Option<TlsSettings>,
    /// A second, TLS, listener (`--tls-listen`); the main one then stays plain.
    pub tls_listen: Option<(String, u16)>,
    /// Length of the listen queue (connections the kernel holds before `accept`).
    pub listen_backlog: i32,
    /// Most simultaneous connections.
    pub max_connections: usize,
    /// Framing limits.
    pub limits: Limits,
    /// Most reply bytes queued for one connection before its input is paused.
    pub max_output_buffer: usize,
    /// Persistence; `None` keeps jobs in memory only.
    pub durability: Option<Durability>,
    /// Most bytes of changes handed to the store's writer and not yet durable; past it no
    /// more commands are read until commits catch up (`--max-uncommitted`).
    pub max_uncommitted: usize,
    /// A batch of changes smaller than this is committed on the loop itself while nothing
    /// else is being committed; 0 hands every batch to the writer (`--inline-commit-below`).
    pub inline_commit_below: usize,
    /// User to switch to after binding.
    pub user: Option<String>,
    /// Queue settings.
    pub engine: engine::Config,
    /// Prometheus metrics (`--metrics`); `None` serves none.
    pub metrics: Option<MetricsConfig>,
}

const LISTENER: Token = Token(usize::MAX - 1);
const SIGNALS: Token = Token(usize::MAX - 2);
const TLS_LISTENER: Token = Token(usize::MAX - 3);
/// Another thread of the process wakes the loop: the metrics thread for a snapshot, the
/// store's writer after a commit (mio allows one waker per poll, so they share it).
const WAKER: Token = Token(usize::MAX - 4);
/// How much to read from a socket at a time.
const READ_CHUNK: usize = 64 * 1024;
/// Connection buffers that grew past this (for a big job) are given back once empty.
const SHRINK_ABOVE: usize = 1 << 20;
/// How often a failing store is retried while replies wait for it.
const COMMIT_RETRY: Duration = Duration::from_millis(100);
/// How often `accept` is retried while the process is out of descriptors.
const ACCEPT_RETRY: Duration = Duration::from_millis(250);
/// Most connections accepted from one listener in one loop turn. A thousand clients
/// connecting at once (a fleet's agents after a restart) otherwise kept the loop accepting
/// for 33–48 ms with `-b` while every other connection waited (BENCHMARKS.md, 2026-12-08,
/// second session); between two shares, the turn serves everyone else.
const ACCEPTS_PER_TURN: usize = 64;
/// Reply records kept allocated between turns.
const RECORDS_KEPT: usize = 4096;
/// Default of `--inline-commit-below`: batches below this many bytes are committed on the
/// loop while nothing is in flight (the writer is idle). The two thread wake-ups of a
/// hand-off cost more than such a commit without an fsync, and with `-f 0` they lengthen
/// every round trip of a lightly loaded server while the loop would only wait
/// (ARCHITECTURE.md, decision 10). A batch that comes while another is in flight, and
/// every larger one, goes to the writer.
pub const DEFAULT_INLINE_COMMIT_BELOW: usize = 16 * 1024;
/// Default of `--max-uncommitted`.
pub const DEFAULT_MAX_UNCOMMITTED: usize = 64 << 20;

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// A listening socket and, for a TLS listener, the configuration its connections use.
struct Bound {
    listener: Listener,
    tls: Option<Arc<rustls::ServerConfig>>,
}

/// A client socket of either kind, or TLS over TCP. The TLS session is boxed so that plain
/// connections stay as small as before.
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls(Box<TlsStream>),
}

impl Stream {
    /// Whether a read shorter than the buffer proves the socket drained (see
    /// `read_and_run`): true for plain sockets; a TLS session may hold decrypted bytes
    /// that the socket no longer signals, so it is read until `WouldBlock`.
    fn short_read_drains(&self) -> bool {
        !matches!(self, Stream::Tls(_))
    }

    /// Whether bytes wait to be written beyond the connection's reply buffer (TLS records).
    fn wants_write(&self) -> bool {
        match self {
            Stream::Tls(s) => s.wants_write(),
            _ => false,
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Source for Stream {
    fn register(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.register(r, t, i),
            Stream::Unix(s) => s.register(r, t, i),
            Stream::Tls(s) => s.socket_mut().register(r, t, i),
        }
    }
    fn reregister(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.reregister(r, t, i),
            Stream::Unix(s) => s.reregister(r, t, i),
            Stream::Tls(s) => s.socket_mut().reregister(r, t, i),
        }
    }
    fn deregister(&mut self, r: &Registry) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.deregister(r),
            Stream::Unix(s) => s.deregister(r),
            Stream::Tls(s) => s.socket_mut().deregister(r),
        }
    }
}

/// One client connection.
struct Connection {
    stream: Stream,
    engine_id: ConnId,
    decoder: Decoder,
    input: BytesMut,
    output: BytesMut,
    /// Waiting in `reserve`: no further commands run until the engine answers.
    blocked: bool,
    /// The peer closed its side, or sent `quit`: close once the output is written.
    closing: bool,
    /// The socket may hold more input that was left unread (backpressure).
    read_pending: bool,
    /// epoll reported the peer's end closed: read on until end of file.
    peer_hup: bool,
    /// Already listed for this turn's flush.
    queued_for_flush: bool,
    /// Its output holds replies to changes whose commit failed: nothing of it is written
    /// until a commit succeeds (then every one of them is true).
    frozen: bool,
    /// Unique for the life of the process (slab tokens are reused): reply records of
    /// turns still in flight name their connection by it.
    serial: u64,
    /// Durable mode: the replies not yet durable, as (turn, end), `end` an absolute output
    /// position; the bytes before the front entry's and after the previous entry's end
    /// belong to that turn. Empty: everything in `output` may be written.
    held: VecDeque<(u64, usize)>,
    /// Absolute position of `output[0]`: bytes written (or dropped) before it.
    out_base: usize,
    /// Absolute end of the bytes that may be written, while `held` is not empty.
    released: usize,
}

impl Connection {
    /// How many bytes at the front of `output` may be written now.
    fn writable(&self) -> usize {
        if self.held.is_empty() {
            self.output.len()
        } else {
            self.released.saturating_sub(self.out_base).min(self.output.len())
        }
    }

    /// Lets the replies of every turn up to `turn` be written.
    fn release_through(&mut self, turn: u64) {
        while let Some(&(t, end)) = self.held.front() {
            if t > turn {
                break;
            }
            self.released = end;
            self.held.pop_front();
        }
    }

    /// Lets every reply be written (after a failed commit was dealt with).
    fn release_all(&mut self) {
        self.held.clear();
        self.released = self.out_base + self.output.len();
    }

    /// `n` bytes of output were written (or dropped).
    fn consumed(&mut self, n: usize) {
        self.output.advance(n);
        self.out_base += n;
    }
}

/// Where one reply sits in a connection's output, for the turn's commit to rewrite if the
/// commit fails (durable mode only; cleared after every commit).
#[derive(Clone, Copy, Debug)]
struct ReplyRecord {
    token: usize,
    /// The connection's [`Connection::serial`].
    serial: u64,
    /// Absolute output positions (see [`Connection::out_base`]).
    start: usize,
    end: usize,
    /// The job the reply is about (from `INSERTED`/`RESERVED`/`FOUND <id>`, or the id the
    /// command named); 0 for none.
    job: u64,
    /// The command (or timer) that produced it changed something durable.
    mutating: bool,
}

/// The job id a reply names, for the three replies that carry one.
fn reply_job_id(bytes: &[u8]) -> Option<u64> {
    let rest = [reply::INSERTED_PREFIX, reply::RESERVED_PREFIX, reply::FOUND_PREFIX]
        .iter()
        .find_map(|prefix| bytes.strip_prefix(*prefix))?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
}

/// Replies from the engine go straight into connection output buffers.
struct Outbox<'a> {
    conns: &'a mut Slab<Connection>,
    tokens: &'a [usize],
    flush: &'a mut Vec<usize>,
    resumed: &'a mut Vec<usize>,
    /// Where each reply went, when the store may have to take replies back.
    records: Option<&'a mut Vec<ReplyRecord>>,
    /// The connection whose command runs, and the job id that command names (0: none).
    caller: Option<(ConnId, u64)>,
    /// Durable mode: the number the turn's batch will have; every reply is held under it.
    turn: u64,
}

impl Outbox<'_> {
    fn append(&mut self, conn: ConnId, parts: &[&[u8]]) {
        let token = self.tokens[conn.0];
        let Some(c) = self.conns.get_mut(token) else { return };
        if !c.queued_for_flush {
            c.queued_for_flush = true;
            self.flush.push(token);
        }
        let start = c.out_base + c.output.len();
        for part in parts {
            c.output.extend_from_slice(part);
        }
        if let Some(records) = &mut self.records {
            let named = self.caller.filter(|(caller, _)| *caller == conn).map_or(0, |(_, job)| job);
            let job = parts.first().and_then(|first| reply_job_id(first)).unwrap_or(named);
            let end = c.out_base + c.output.len();
            records.push(ReplyRecord { token, serial: c.serial, start, end, job, mutating: false });
            match c.held.back_mut() {
                Some((turn, held_end)) if *turn == self.turn => *held_end = end,
                _ => c.held.push_back((self.turn, end)),
            }
        }
        if c.blocked {
            c.blocked = false;
            self.resumed.push(token);
        }
    }
}

impl ReplySink for Outbox<'_> {
    fn send(&mut self, conn: ConnId, bytes: &[u8]) {
        self.append(conn, &[bytes]);
    }

    fn send_parts(&mut self, conn: ConnId, parts: &[&[u8]]) {
        self.append(conn, parts);
    }
}

/// A turn whose changes the writer has and has not yet reported durable.
struct InFlight {
    /// The batch's number.
    turn: u64,
    /// Its replies are written once it is durable, and so are those of the turns after it
    /// that changed nothing, up to this one.
    releases_through: u64,
    /// What it changed (job ids, final states), for a failed commit to undo or redo.
    changes: engine::Changes,
    /// Its replies (and those of the turns up to `releases_through`).
    records: Vec<ReplyRecord>,
    /// What the batch holds, counted against `--max-uncommitted`.
    bytes: usize,
}

/// Durable mode: the store's writer and the turns in flight.
struct Durable {
    pipeline: CommitPipeline,
    inflight: VecDeque<InFlight>,
    /// Sum of the in-flight batches' bytes.
    uncommitted: usize,
    max_uncommitted: usize,
    /// `--inline-commit-below`.
    inline_commit_below: usize,
    /// The last batch the writer reported on (durable or failed).
    reported: u64,
    /// The highest job id in a batch handed over (a new id must reach the disk even if its
    /// job is already gone: as a row, or in `meta`).
    last_id_submitted: u64,
    /// A commit failed: handled at the end of the turn (`recover`), once every batch in
    /// flight is reported.
    failure: Option<StoreError>,
    /// While failing: the changes not yet committed, retried with every commit.
    pending: engine::Changes,
    /// When the store started failing, if it is failing (commits are then synchronous).
    failing_since: Option<Instant>,
    /// Connections not read from because too much is uncommitted.
    unread: Vec<usize>,
    records_written: u64,
    /// Reply-record vectors of finished turns, reused.
    spare: Vec<Vec<ReplyRecord>>,
}

/// Flags set by signal handlers.
struct Signals {
    shutdown: Arc<AtomicBool>,
    drain: Arc<AtomicBool>,
    wake: UnixStream,
}

/// The running server.
pub struct Server {
    poll: Poll,
    listener: Bound,
    /// The second listener of `--tls-listen`.
    tls_listener: Option<Bound>,
    conns: Slab<Connection>,
    /// Engine connection id -> slab token.
    tokens: Vec<usize>,
    engine: Engine,
    durable: Option<Durable>,
    cfg: ServerConfig,
    started: Instant,
    signals: Signals,
    flush: Vec<usize>,
    resumed: Vec<usize>,
    /// Connections with unread or unprocessed input to revisit.
    backlog: Vec<usize>,
    /// Connections to close at the end of the turn.
    to_close: Vec<usize>,
    local_addr: String,
    tls_local_addr: Option<String>,
    /// Read buffer shared by all connections; bytes are copied into the
    /// connection's own input only as far as they were read.
    scratch: Box<[u8]>,
    /// This turn's replies (durable mode), for a failed commit to rewrite.
    records: Vec<ReplyRecord>,
    /// Connections whose output waits for a commit to succeed.
    frozen: Vec<usize>,
    /// The next connection's [`Connection::serial`].
    next_serial: u64,
    /// The longest loop turn so far.
    longest_turn: Duration,
    /// The last `accept` ran out of descriptors: connections wait in the listen queue.
    accept_stalled: bool,
    /// A listener still had connections waiting when the turn's share of accepts
    /// ([`ACCEPTS_PER_TURN`]) was used up: the next turn comes at once and goes on.
    accept_more: bool,
    /// `--metrics`: snapshots for the metrics thread.
    metrics: Option<Metrics>,
}

impl Server {
    /// Opens the store (if any), binds the listener and prepares the loop.
    pub fn bind(cfg: ServerConfig) -> anyhow::Result<Server> {
        let poll = Poll::new().context("creating the poll instance")?;
        // The TLS files are read before anything is bound, so a bad one fails the start at once.
        let tls = cfg.tls.as_ref().map(crate::tls::server_config).transpose()?;
        let (mut listener, local_addr) = open_listener(&cfg.listen, cfg.listen_backlog)?;
        register_listener(poll.registry(), &mut listener, LISTENER)?;
        let (listener, tls_listener, tls_local_addr) = match (&cfg.tls_listen, tls) {
            (Some((host, port)), Some(tls)) => {
                let (mut second, addr) = open_tcp_listener(host, *port, cfg.listen_backlog)?;
                register_listener(poll.registry(), &mut second, TLS_LISTENER)?;
                log::info!(
                    "TLS on {addr}{}",
                    if cfg.tls.as_ref().is_some_and(|t| t.client_ca.is_some()) {
                        ", client certificates required"
                    } else {
                        ""
                    }
                );
                (Bound { listener, tls: None }, Some(Bound { listener: second, tls: Some(tls) }), Some(addr))
            }
            (Some(_), None) => bail!("--tls-listen needs --tls-cert and --tls-key"),
            (None, Some(tls)) => {
                if matches!(listener, Listener::Unix(_)) {
                    bail!(
                        "TLS needs a TCP listener, and {local_addr} is a Unix socket: give a TCP -l, or \
                         --tls-listen HOST:PORT for a second, TLS, listener"
                    );
                }
                log::info!("TLS on the main listener {local_addr}");
                (Bound { listener, tls: Some(tls) }, None, None)
            }
            (None, None) => (Bound { listener, tls: None }, None, None),
        };
        // Bound with the listeners, before privileges are dropped; served once the store is open.
        let metrics = cfg.metrics.as_ref().map(crate::metrics::bind).transpose()?;
        if let Some(user) = &cfg.user {
            sys::become_user(user)?;
        }
        let started = Instant::now();
        let mut engine_cfg = cfg.engine.clone();
        engine_cfg.instance = instance_info();
        engine_cfg.rusage = rusage;
        let mut engine = Engine::new(engine_cfg, CLOCK_ORIGIN, cfg.durability.is_some());
        // Before the first thread of the store or the metrics starts.
        sys::reserve_descriptor_table(cfg.max_connections.saturating_add(64));
        let store = match &cfg.durability {
            Some(_) if cfg.engine.max_job_size > crate::store::MAX_STORED_BODY => bail!(
                "-z {} is larger than a job the store can keep: with -b, -z may be at most {} (SQLite's \
                 largest value)",
                cfg.engine.max_job_size,
                crate::store::MAX_STORED_BODY
            ),
            Some(d) => {
                let mut store = Store::open(d)?;
                let t0 = Instant::now();
                let restored = store.load_into(&mut engine, CLOCK_ORIGIN)?;
                log::info!("restored {restored} jobs from {} in {:?}", store.path().display(), t0.elapsed());
                Some(store)
            }
            None => None,
        };
        let signals = install_signals(poll.registry())?;
        let view = store.as_ref().map(|s| StoreView {
            metrics: s.metrics().clone(),
            db: s.path().to_path_buf(),
            wal: s.wal_path(),
        });
        let waker = Arc::new(mio::Waker::new(poll.registry(), WAKER).context("creating the loop's waker")?);
        let metrics = match metrics {
            Some(bound) => Some(bound.start(Arc::clone(&waker), view, started)?),
            None => None,
        };
        let durable = match store {
            Some(store) => {
                let pipeline =
                    CommitPipeline::start(store, Arc::clone(&waker)).context("starting the store's writer thread")?;
                Some(Durable {
                    pipeline,
                    inflight: VecDeque::new(),
                    uncommitted: 0,
                    max_uncommitted: cfg.max_uncommitted.max(1),
                    inline_commit_below: cfg.inline_commit_below,
                    reported: 0,
                    last_id_submitted: engine.last_id(),
                    failure: None,
                    pending: engine::Changes::default(),
                    failing_since: None,
                    unread: Vec::new(),
                    records_written: 0,
                    spare: Vec::new(),
                })
            }
            None => None,
        };
        Ok(Server {
            poll,
            listener,
            tls_listener,
            conns: Slab::new(),
            tokens: Vec::new(),
            engine,
            durable,
            cfg,
            started,
            signals,
            flush: Vec::new(),
            resumed: Vec::new(),
            backlog: Vec::new(),
            to_close: Vec::new(),
            local_addr,
            tls_local_addr,
            scratch: vec![0; READ_CHUNK].into_boxed_slice(),
            records: Vec::new(),
            frozen: Vec::new(),
            next_serial: 0,
            longest_turn: Duration::ZERO,
            accept_stalled: false,
            accept_more: false,
            metrics,
        })
    }

    /// The address clients connect to (`host:port` or `unix:/path`).
    pub fn local_addr(&self) -> &str {
        &self.local_addr
    }

    /// The address of the second, TLS, listener (`--tls-listen`), if there is one.
    pub fn tls_local_addr(&self) -> Option<&str> {
        self.tls_local_addr.as_deref()
    }

    /// The address `/metrics` is served on (`--metrics`), if it is.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics.as_ref().map(Metrics::local_addr)
    }

    fn now(&self) -> Nanos {
        CLOCK_ORIGIN.saturating_add(u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX))
    }

    /// Runs until SIGTERM or SIGINT, then commits and returns.
    pub fn run(&mut self) -> anyhow::Result<()> {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = self.poll_timeout();
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e).context("polling");
            }
            let turn_started = Instant::now();
            let now = self.now();
            self.absorb_completions()?;
            if self.accept_stalled || std::mem::take(&mut self.accept_more) {
                self.accept_all();
            }
            self.with_outbox(|engine, out| engine.tick(now, out));
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept_from(LISTENER),
                    TLS_LISTENER => self.accept_from(TLS_LISTENER),
                    SIGNALS => self.drain_signal_pipe(),
                    // A scrape: answered at the end of the turn. A commit: taken in above.
                    WAKER => {}
                    Token(token) => {
                        if event.is_read_closed() || event.is_error() {
                            if let Some(c) = self.conns.get_mut(token) {
                                c.peer_hup = true;
                            }
                        }
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            self.read_and_run(token, now);
                        }
                        if event.is_writable() {
                            self.queue_flush(token);
                        }
                    }
                }
            }
            self.run_backlog(now);
            self.commit(now)?;
            self.flush_all();
            self.close_pending(now)?;
            if let Some(metrics) = &mut self.metrics {
                metrics.publish_if_asked(&self.engine);
            }
            let turn = turn_started.elapsed();
            if turn > self.longest_turn {
                self.longest_turn = turn;
                self.publish_loop_stats();
            }
            if self.signals.shutdown.load(Ordering::Relaxed) {
                log::info!("shutting down");
                return self.shut_down();
            }
        }
    }

    /// Commits what is left, waits until every batch is durable, writes the replies and
    /// stops the writer after a last fsync.
    fn shut_down(&mut self) -> anyhow::Result<()> {
        let now = self.now();
        self.commit(now)?;
        while let Some(durable) = &mut self.durable {
            if durable.failure.is_some() {
                self.commit(now)?;
                continue;
            }
            if durable.inflight.is_empty() {
                break;
            }
            let done = durable.pipeline.wait()?;
            self.on_completion(done);
        }
        self.flush_all();
        if let Some(durable) = self.durable.take() {
            durable.pipeline.stop().context("final sync")?;
        }
        Ok(())
    }

    fn poll_timeout(&self) -> Option<Duration> {
        if !self.backlog.is_empty() || !self.resumed.is_empty() || self.accept_more {
            return Some(Duration::ZERO);
        }
        let now = self.now();
        let timeout = self.engine.next_deadline().map(|d| Duration::from_nanos(d.saturating_sub(now)));
        // Round up so a timer is never woken for a fraction too early.
        let timeout = timeout.map(|t| t + Duration::from_micros(100));
        // A snapshot the metrics thread is waiting for could not be published yet.
        let timeout = if self.metrics.as_ref().is_some_and(Metrics::wants_retry) {
            Some(timeout.map_or(crate::metrics::PUBLISH_RETRY, |t| t.min(crate::metrics::PUBLISH_RETRY)))
        } else {
            timeout
        };
        // Replies waiting for a commit, or connections waiting for a descriptor: try again
        // soon even if nothing else happens.
        let retry = match (self.frozen.is_empty(), self.accept_stalled) {
            (true, false) => return timeout,
            (false, _) => COMMIT_RETRY,
            (true, true) => ACCEPT_RETRY,
        };
        Some(timeout.map_or(retry, |t| t.min(retry)))
    }

    fn with_outbox<R>(&mut self, f: impl FnOnce(&mut Engine, &mut Outbox<'_>) -> R) -> R {
        self.with_caller_outbox(None, f)
    }

    /// Runs `f` on the engine with replies going to the connections; in durable mode every
    /// reply is recorded, and marked mutating when `f` changed something durable.
    fn with_caller_outbox<R>(
        &mut self,
        caller: Option<(ConnId, u64)>,
        f: impl FnOnce(&mut Engine, &mut Outbox<'_>) -> R,
    ) -> R {
        let recording = self.durable.is_some();
        let turn = self.durable.as_ref().map_or(0, |d| d.pipeline.submitted() + 1);
        let (mutations, first) = (self.engine.mutation_count(), self.records.len());
        let mut out = Outbox {
            conns: &mut self.conns,
            tokens: &self.tokens,
            flush: &mut self.flush,
            resumed: &mut self.resumed,
            records: recording.then_some(&mut self.records),
            caller,
            turn,
        };
        let result = f(&mut self.engine, &mut out);
        if recording && self.engine.mutation_count() != mutations {
            for record in &mut self.records[first..] {
                record.mutating = true;
            }
        }
        result
    }

    /// Accepts on every listener (after descriptors ran out).
    fn accept_all(&mut self) {
        self.accept_from(LISTENER);
        if self.tls_listener.is_some() {
            self.accept_from(TLS_LISTENER);
        }
    }

    fn accept_from(&mut self, which: Token) {
        let mut accepted_here = 0;
        loop {
            if accepted_here == ACCEPTS_PER_TURN {
                // Readiness is edge-triggered: no new event comes for the connections still
                // queued, so the next turn (which polls without waiting) accepts them.
                self.accept_more = true;
                return;
            }
            let bound = match which {
                TLS_LISTENER => match &self.tls_listener {
                    Some(bound) => bound,
                    None => return,
                },
                _ => &self.listener,
            };
            let accepted = match &bound.listener {
                Listener::Tcp(l) => l.accept().map(|(s, _)| {
                    // Replies are small and latency matters more than packet count.
                    let _ = s.set_nodelay(true);
                    match &bound.tls {
                        None => Ok(Stream::Tcp(s)),
                        Some(config) => TlsStream::new(config, s).map(|t| Stream::Tls(Box::new(t))),
                    }
                }),
                Listener::Unix(l) => l.accept().map(|(s, _)| Ok(Stream::Unix(s))),
            };
            let mut stream = match accepted {
                Ok(Err(e)) => {
                    log::warn!("starting a TLS session failed: {e}");
                    continue;
                }
                Ok(Ok(s)) => {
                    self.accept_stalled = false;
                    s
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if sys::out_of_descriptors(&e) => {
                    // The connection waits in the listen queue; no new readiness event comes
                    // for it, so accept again when a descriptor is freed (a connection
                    // closes) and, meanwhile, every ACCEPT_RETRY.
                    if !self.accept_stalled {
                        log::warn!("accept failed: {e}; retrying when a connection closes");
                    }
                    self.accept_stalled = true;
                    return;
                }
                Err(e) => {
                    log::warn!("accept failed: {e}");
                    return;
                }
            };
            if self.conns.len() >= self.cfg.max_connections {
                log::warn!("connection limit of {} reached; closing a new connection", self.cfg.max_connections);
                continue;
            }
            let entry = self.conns.vacant_entry();
            let token = entry.key();
            if let Err(e) =
                self.poll.registry().register(&mut stream, Token(token), Interest::READABLE | Interest::WRITABLE)
            {
                log::warn!("registering a connection failed: {e}");
                continue;
            }
            let engine_id = self.engine.connect();
            if self.tokens.len() <= engine_id.0 {
                self.tokens.resize(engine_id.0 + 1, usize::MAX);
            }
            self.tokens[engine_id.0] = token;
            entry.insert(Connection {
                stream,
                engine_id,
                decoder: Decoder::new(self.cfg.limits),
                input: BytesMut::with_capacity(1024),
                output: BytesMut::new(),
                blocked: false,
                closing: false,
                read_pending: false,
                peer_hup: false,
                queued_for_flush: false,
                frozen: false,
                serial: self.next_serial,
                held: VecDeque::new(),
                out_base: 0,
                released: 0,
            });
            self.next_serial += 1;
            accepted_here += 1;
        }
    }

    /// Reads what the socket has (within the backpressure bounds) and runs the
    /// complete commands.
    fn read_and_run(&mut self, token: usize, now: Nanos) {
        loop {
            let Some(c) = self.conns.get_mut(token) else { return };
            if c.closing {
                return;
            }
            if let Some(durable) = self.durable.as_mut().filter(|d| d.uncommitted >= d.max_uncommitted) {
                // The disk is behind the clients: read nothing more until commits catch
                // up (`on_completion`), so memory stays bounded.
                c.read_pending = true;
                durable.unread.push(token);
                return;
            }
            if c.blocked || c.output.len() >= self.cfg.max_output_buffer {
                // Stalled: leave the rest in the socket until the engine answers
                // the wait or the client reads its replies (see `resume`).
                c.read_pending = true;
                // A blocked connection still has to notice a hang-up.
                if c.blocked && peer_closed(&mut c.stream) {
                    self.hang_up(token);
                }
                return;
            }
            // Backpressure: hold at most one chunk (or the body being read) in memory.
            let wanted = c.decoder.body_bytes_wanted().unwrap_or(0).max(READ_CHUNK);
            if c.input.len() >= wanted {
                c.read_pending = true;
                self.run_input(token, now);
                continue;
            }
            match c.stream.read(&mut self.scratch) {
                Ok(0) => {
                    c.read_pending = false;
                    self.run_input(token, now);
                    self.hang_up(token);
                    return;
                }
                Ok(n) => {
                    c.input.extend_from_slice(&self.scratch[..n]);
                    // A short read emptied the socket: data arriving later raises
                    // a new edge, so this saves the read that would say WouldBlock.
                    // (Not after a hang-up: its edge is spent, so read to the end. Not
                    // for TLS either: the session may hold decrypted bytes the socket
                    // will never signal again, so TLS reads go on until WouldBlock.)
                    let drained = n < self.scratch.len() && !c.peer_hup && c.stream.short_read_drains();
                    if drained {
                        c.read_pending = false;
                    }
                    self.run_input(token, now);
                    if drained {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    c.read_pending = false;
                    self.run_input(token, now);
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("read error on connection {token}: {e}");
                    c.closing = true;
                    self.to_close.push(token);
                    return;
                }
            }
        }
    }

    /// Lists a connection that was stalled (blocked, or with too much output)
    /// for another look, if it has input left to act on.
    fn resume(&mut self, token: usize) {
        if let Some(c) = self.conns.get(token) {
            let stalled = c.blocked || c.output.len() >= self.cfg.max_output_buffer;
            if !stalled && !c.closing && (c.read_pending || !c.input.is_empty()) {
                self.backlog.push(token);
            }
        }
    }

    /// The peer closed its sending side. Commands it sent before are already
    /// done; a `reserve` still waiting ends with `TIMED_OUT` (as in beanstalkd),
    /// and the connection closes once its output is written.
    fn hang_up(&mut self, token: usize) {
        let Some(c) = self.conns.get_mut(token) else { return };
        c.closing = true;
        let conn = c.engine_id;
        self.with_outbox(|engine, out| engine.abort_wait(conn, out));
        self.to_close.push(token);
    }

    /// Runs every complete command buffered on `token`, until it blocks or its
    /// output backs up.
    fn run_input(&mut self, token: usize, now: Nanos) {
        loop {
            let Some(c) = self.conns.get_mut(token) else { return };
            if c.blocked || c.output.len() >= self.cfg.max_output_buffer {
                // Picked up again by `resume` once it can make progress.
                return;
            }
            let Some(decoded) = c.decoder.decode(&mut c.input) else { return };
            let conn = c.engine_id;
            let named = match &decoded {
                Decoded::Command(cmd) => cmd.job_id().unwrap_or(0),
                _ => 0,
            };
            let outcome =
                self.with_caller_outbox(Some((conn, named)), |engine, out| engine.feed(conn, decoded, now, out));
            match outcome {
                Outcome::Done => {}
                Outcome::Blocked => {
                    if let Some(c) = self.conns.get_mut(token) {
                        c.blocked = true;
                    }
                    return;
                }
                Outcome::Close => {
                    if let Some(c) = self.conns.get_mut(token) {
                        c.closing = true;
                        c.input.clear();
                    }
                    self.to_close.push(token);
                    return;
                }
            }
        }
    }

    /// Revisits connections that were woken (their `reserve` was answered) or
    /// held back, until none can progress. A command on one connection can wake
    /// another, hence the loop; stalled connections are never listed, so it ends.
    fn run_backlog(&mut self, now: Nanos) {
        while !self.resumed.is_empty() || !self.backlog.is_empty() {
            let mut work = std::mem::take(&mut self.backlog);
            work.append(&mut self.resumed);
            work.sort_unstable();
            work.dedup();
            for token in work {
                let read_pending = self.conns.get(token).is_some_and(|c| c.read_pending);
                if read_pending {
                    self.read_and_run(token, now);
                } else {
                    self.run_input(token, now);
                }
            }
        }
    }

    fn queue_flush(&mut self, token: usize) {
        if let Some(c) = self.conns.get_mut(token) {
            if !c.queued_for_flush && (!c.output.is_empty() || c.stream.wants_write()) {
                c.queued_for_flush = true;
                self.flush.push(token);
            }
        }
    }

    /// Takes in the writer's reports that are waiting.
    fn absorb_completions(&mut self) -> Result<(), WriterGone> {
        while let Some(done) = match &self.durable {
            Some(durable) => durable.pipeline.try_completion()?,
            None => None,
        } {
            self.on_completion(done);
        }
        Ok(())
    }

    /// A report from the writer: the replies of every turn it covers may be written, or
    /// (a failure) they wait for [`Server::recover`] at the end of the turn.
    fn on_completion(&mut self, done: Completion) {
        let Some(durable) = &mut self.durable else { return };
        durable.reported = done.through;
        let written = match done.result {
            Ok(written) => written,
            Err(e) => {
                // Every batch in flight after it is refused by the writer: recovery takes
                // them all together once each one is reported.
                if durable.failure.is_none() {
                    durable.failure = Some(e);
                }
                return;
            }
        };
        durable.records_written += written;
        while durable.inflight.front().is_some_and(|f| f.turn <= done.through) {
            let Some(mut finished) = durable.inflight.pop_front() else { break };
            durable.uncommitted -= finished.bytes;
            release(&mut self.conns, &mut self.flush, &finished.records, finished.releases_through);
            finished.records.clear();
            if finished.records.capacity() <= RECORDS_KEPT {
                durable.spare.push(finished.records);
            }
        }
        if durable.uncommitted < durable.max_uncommitted && !durable.unread.is_empty() {
            self.backlog.append(&mut durable.unread);
        }
    }

    /// The end of a turn, in durable mode: hands what it changed to the writer, or (if
    /// it changed nothing) lets its replies out once the turns before it are durable.
    fn commit(&mut self, now: Nanos) -> Result<(), WriterGone> {
        self.absorb_completions()?;
        if self.durable.as_ref().is_some_and(|d| d.failure.is_some()) {
            // Wait until the writer has reported every batch in flight: none of them will
            // be written now, so their changes and replies can be dealt with together.
            while let Some(durable) =
                self.durable.as_ref().filter(|d| d.inflight.back().is_some_and(|f| f.turn > d.reported))
            {
                let done = durable.pipeline.wait()?;
                self.on_completion(done);
            }
            return self.recover(now);
        }
        let Some(durable) = &mut self.durable else { return Ok(()) };
        if durable.failing_since.is_some() {
            return self.commit_while_failing(now);
        }
        let changes = self.engine.take_changes();
        let records = std::mem::replace(&mut self.records, durable.spare.pop().unwrap_or_default());
        let last_id = self.engine.last_id();
        if changes.is_empty() && last_id == durable.last_id_submitted {
            if records.is_empty() {
                self.records = records;
                return Ok(());
            }
            let turn = durable.pipeline.number_without_batch();
            match durable.inflight.back_mut() {
                // What it read may come from the turns in flight: out with the last of them.
                Some(last) => {
                    last.releases_through = turn;
                    last.records.extend_from_slice(&records);
                    self.records = records;
                    self.records.clear();
                }
                None => {
                    release(&mut self.conns, &mut self.flush, &records, turn);
                    self.records = records;
                    self.records.clear();
                }
            }
        } else {
            let batch = Batch::snapshot(&changes, &self.engine, now);
            let bytes = batch.bytes();
            if durable.inflight.is_empty() && bytes < durable.inline_commit_below {
                if let Some((turn, result)) = durable.pipeline.commit_here(&batch) {
                    durable.last_id_submitted = last_id;
                    durable.reported = turn;
                    match result {
                        Ok(written) => {
                            durable.records_written += written;
                            release(&mut self.conns, &mut self.flush, &records, turn);
                            self.records = records;
                            self.records.clear();
                        }
                        Err(e) => {
                            durable.failure = Some(e);
                            durable.inflight.push_back(InFlight {
                                turn,
                                releases_through: turn,
                                changes,
                                records,
                                bytes: 0,
                            });
                            return self.recover(now);
                        }
                    }
                    self.publish_loop_stats();
                    return Ok(());
                }
            }
            let turn = durable.pipeline.submit(batch)?;
            durable.last_id_submitted = last_id;
            durable.uncommitted += bytes;
            durable.inflight.push_back(InFlight { turn, releases_through: turn, changes, records, bytes });
        }
        self.publish_loop_stats();
        Ok(())
    }

    /// The store fails: commits are synchronous, one per turn, with every change not yet
    /// committed, until one succeeds.
    fn commit_while_failing(&mut self, now: Nanos) -> Result<(), WriterGone> {
        let Some(durable) = &mut self.durable else { return Ok(()) };
        let mut changes = std::mem::take(&mut durable.pending);
        merge(&mut changes, self.engine.take_changes());
        let batch = Batch::snapshot(&changes, &self.engine, now);
        let records = std::mem::take(&mut self.records);
        match durable.pipeline.retry(batch)? {
            Ok(written) => {
                durable.records_written += written;
                durable.last_id_submitted = self.engine.last_id();
                release_every(&mut self.conns, &mut self.flush, &records);
                self.commit_succeeded();
            }
            Err(e) => self.commit_failed(e, changes, records, now)?,
        }
        self.publish_loop_stats();
        Ok(())
    }

    /// A commit failed while others were in flight: every turn since the last durable one
    /// (and this one) is handled as one failed turn.
    fn recover(&mut self, now: Nanos) -> Result<(), WriterGone> {
        let Some(durable) = &mut self.durable else { return Ok(()) };
        let Some(error) = durable.failure.take() else { return Ok(()) };
        let mut changes = std::mem::take(&mut durable.pending);
        let mut records = Vec::new();
        for turn in durable.inflight.drain(..) {
            merge(&mut changes, turn.changes);
            records.extend_from_slice(&turn.records);
        }
        durable.uncommitted = 0;
        if !durable.unread.is_empty() {
            self.backlog.append(&mut durable.unread);
        }
        merge(&mut changes, self.engine.take_changes());
        records.append(&mut self.records);
        self.commit_failed(error, changes, records, now)?;
        self.publish_loop_stats();
        Ok(())
    }

    fn publish_loop_stats(&mut self) {
        let longest_turn_us = u64::try_from(self.longest_turn.as_micros()).unwrap_or(u64::MAX);
        let Some(durable) = &self.durable else {
            self.engine.set_loop_stats(engine::LoopStats { longest_turn_us, ..engine::LoopStats::default() });
            return;
        };
        self.engine
            .set_binlog_stats(engine::BinlogStats { records_written: durable.records_written, records_migrated: 0 });
        self.engine.set_loop_stats(engine::LoopStats {
            longest_turn_us,
            commits_in_flight: durable.inflight.len() as u64,
            uncommitted_bytes: durable.uncommitted as u64,
            max_uncommitted_bytes: durable.max_uncommitted as u64,
        });
    }

    /// Everything changed so far is durable: every held reply is now true.
    fn commit_succeeded(&mut self) {
        if let Some(since) = self.durable.as_mut().and_then(|d| d.failing_since.take()) {
            log::warn!("the store commits again, after failing for {:?}", since.elapsed());
        }
        for token in std::mem::take(&mut self.frozen) {
            if let Some(c) = self.conns.get_mut(token) {
                c.frozen = false;
            }
            self.queue_flush(token);
            self.resume(token);
        }
    }

    /// A failed commit (of one turn, or of several turns in flight: `changes` and
    /// `records` are theirs) must leave every command with exactly one true reply:
    /// - jobs created in those turns that are still live are dropped (nobody may learn they
    ///   existed), and each reply about one — its `INSERTED`, a `RESERVED` that handed it
    ///   out, any command that named it — becomes `OUT_OF_MEMORY` (for a `put` refused for
    ///   want of space, as beanstalkd answers when it cannot reserve binlog space) or
    ///   `INTERNAL_ERROR`;
    /// - the other changes are committed again at once without the new jobs (a `delete`
    ///   frees space, so on a full disk this usually succeeds) and their replies stand;
    /// - if that fails too, the connections whose replies report a change are frozen: their
    ///   replies are held (never written, never replaced) until a commit succeeds, retried
    ///   every [`COMMIT_RETRY`]. Replies that only read are written as usual.
    fn commit_failed(
        &mut self,
        error: StoreError,
        mut changes: engine::Changes,
        mut records: Vec<ReplyRecord>,
        now: Nanos,
    ) -> Result<(), WriterGone> {
        let refusal = if error.is_full() { reply::OUT_OF_MEMORY } else { reply::INTERNAL_ERROR };
        // A job put and deleted within the failed turns is gone already: its replies stand,
        // and its final state is committed with the rest.
        let inserted: HashSet<JobId, IdHashBuilder> =
            changes.inserted.iter().copied().filter(|&id| self.engine.job_record(id, now).is_some()).collect();
        if !inserted.is_empty() {
            let ids: Vec<JobId> = inserted.iter().copied().collect();
            self.engine.discard_jobs(&ids);
            self.take_back_replies(&mut records, &inserted, refusal);
        }
        // The dropped jobs stay in `changes.jobs`: no longer live, each is written as a
        // delete, because a commit whose fsync failed (`-f 0`) did reach SQLite and its rows
        // must go; after a commit that failed outright the deletes find nothing.
        changes.inserted.clear();
        let Some(durable) = &mut self.durable else { return Ok(()) };
        let retried = durable.pipeline.retry(Batch::snapshot(&changes, &self.engine, now))?;
        release_every(&mut self.conns, &mut self.flush, &records);
        match retried {
            Ok(written) => {
                durable.records_written += written;
                durable.last_id_submitted = self.engine.last_id();
                log::warn!(
                    "commit failed ({error}); {} new job(s) refused, the other changes committed",
                    inserted.len()
                );
                self.commit_succeeded();
            }
            Err(again) => {
                if durable.failing_since.is_none() {
                    log::error!("commit failed ({error}), and again without the new jobs ({again}): replies that report a change are held until a commit succeeds");
                    durable.failing_since = Some(Instant::now());
                }
                durable.pending = changes;
                let mut tokens: Vec<usize> = records
                    .iter()
                    .filter(|r| r.mutating && !inserted.contains(&JobId(r.job)))
                    .filter(|r| self.conns.get(r.token).is_some_and(|c| c.serial == r.serial))
                    .map(|r| r.token)
                    .collect();
                tokens.sort_unstable();
                tokens.dedup();
                for token in tokens {
                    if let Some(c) = self.conns.get_mut(token) {
                        if !c.frozen {
                            c.frozen = true;
                            self.frozen.push(token);
                        }
                    }
                }
            }
        }
        records.clear();
        if records.capacity() <= RECORDS_KEPT {
            self.records = records;
        }
        Ok(())
    }

    /// Replaces, in place, every reply in `records` about a job in `dropped`: a `put`'s
    /// by `refusal`, any other by `INTERNAL_ERROR`. The replies are all still held, so
    /// none of them was written.
    fn take_back_replies(
        &mut self,
        records: &mut [ReplyRecord],
        dropped: &HashSet<JobId, IdHashBuilder>,
        refusal: &[u8],
    ) {
        // Stable: each connection's replies stay in the order they were made.
        records.sort_by_key(|r| r.token);
        for group in records.chunk_by(|a, b| a.token == b.token && a.serial == b.serial) {
            if !group.iter().any(|r| dropped.contains(&JobId(r.job))) {
                continue;
            }
            let Some(c) = self.conns.get_mut(group[0].token).filter(|c| c.serial == group[0].serial) else {
                continue;
            };
            // Gone already if the connection failed and its output was dropped.
            let Some(first) = group[0].start.checked_sub(c.out_base).filter(|&at| at <= c.output.len()) else {
                continue;
            };
            let old = c.output.split_off(first);
            for r in group {
                let (start, end) = (r.start - group[0].start, r.end - group[0].start);
                let Some(bytes) = old.get(start..end) else { continue };
                if dropped.contains(&JobId(r.job)) {
                    let put = bytes.starts_with(reply::INSERTED_PREFIX);
                    c.output.extend_from_slice(if put { refusal } else { reply::INTERNAL_ERROR });
                } else {
                    c.output.extend_from_slice(bytes);
                }
            }
        }
    }

    fn flush_all(&mut self) {
        let tokens = std::mem::take(&mut self.flush);
        for token in tokens {
            let Some(c) = self.conns.get_mut(token) else { continue };
            c.queued_for_flush = false;
            if c.frozen {
                // Queued again when a commit succeeds.
                continue;
            }
            let mut failed = false;
            loop {
                let writable = c.writable();
                if writable == 0 {
                    break;
                }
                match c.stream.write(&c.output[..writable]) {
                    Ok(0) => {
                        failed = true;
                        break;
                    }
                    Ok(n) => c.consumed(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        log::debug!("write error on connection {token}: {e}");
                        // Nobody will read them: neither these replies nor the held ones.
                        c.consumed(c.output.len());
                        c.release_all();
                        failed = true;
                        break;
                    }
                }
            }
            // TLS records still unwritten (the handshake's, or the tail of a reply).
            if let (Stream::Tls(tls), false, true) = (&mut c.stream, failed, c.output.is_empty()) {
                match tls.write_pending() {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => {
                        log::debug!("write error on connection {token}: {e}");
                        failed = true;
                    }
                }
            }
            if failed {
                c.closing = true;
                self.to_close.push(token);
            }
            // A connection that once received a huge job should not keep a
            // huge buffer for the rest of its life.
            if c.output.is_empty() && c.output.capacity() > SHRINK_ABOVE {
                c.output = BytesMut::new();
            }
            if c.input.is_empty() && c.input.capacity() > SHRINK_ABOVE {
                c.input = BytesMut::with_capacity(1024);
            }
            self.resume(token);
        }
    }

    fn close_pending(&mut self, now: Nanos) -> Result<(), WriterGone> {
        let mut later = Vec::new();
        while let Some(token) = self.to_close.pop() {
            let Some(c) = self.conns.get(token) else { continue };
            if c.frozen || !c.held.is_empty() {
                // Its replies are not durable yet, or their commit failed: close once they
                // are written.
                later.push(token);
                continue;
            }
            // Give a closing connection one chance to receive what it was sent.
            if !c.output.is_empty() && !c.blocked {
                let c = &mut self.conns[token];
                let _ = c.stream.write(&c.output);
            }
            if let Stream::Tls(tls) = &mut self.conns[token].stream {
                tls.close();
            }
            let mut c = self.conns.remove(token);
            let _ = self.poll.registry().deregister(&mut c.stream);
            let conn = c.engine_id;
            self.with_outbox(|engine, out| engine.disconnect(conn, now, out));
            self.tokens[conn.0] = usize::MAX;
        }
        self.to_close = later;
        if self.accept_stalled {
            // Descriptors were freed: the connections waiting in the listen queue first.
            self.accept_all();
        }
        // Disconnects may have woken waiters on other connections.
        if !self.resumed.is_empty() || !self.flush.is_empty() {
            self.run_backlog(now);
            self.commit(now)?;
            self.flush_all();
        }
        Ok(())
    }

    fn drain_signal_pipe(&mut self) {
        let mut buf = [0u8; 64];
        while let Ok(n) = self.signals.wake.read(&mut buf) {
            if n == 0 {
                break;
            }
        }
        if self.signals.drain.load(Ordering::Relaxed) && !self.engine.draining() {
            log::info!("entering drain mode");
            self.engine.set_draining();
        }
    }
}

/// Lets the replies of every turn up to `turn` out on the connections of `records`.
fn release(conns: &mut Slab<Connection>, flush: &mut Vec<usize>, records: &[ReplyRecord], turn: u64) {
    for r in records {
        let Some(c) = conns.get_mut(r.token).filter(|c| c.serial == r.serial) else { continue };
        if c.held.front().is_some_and(|&(t, _)| t <= turn) {
            c.release_through(turn);
            if !c.queued_for_flush {
                c.queued_for_flush = true;
                flush.push(r.token);
            }
        }
    }
}

/// Lets every reply out on the connections of `records` (a failed commit was dealt with;
/// frozen connections still write nothing).
fn release_every(conns: &mut Slab<Connection>, flush: &mut Vec<usize>, records: &[ReplyRecord]) {
    for r in records {
        let Some(c) = conns.get_mut(r.token).filter(|c| c.serial == r.serial) else { continue };
        if !c.held.is_empty() {
            c.release_all();
            if !c.queued_for_flush {
                c.queued_for_flush = true;
                flush.push(r.token);
            }
        }
    }
}

/// Adds `from` to `into`.
fn merge(into: &mut engine::Changes, from: engine::Changes) {
    into.jobs.extend(from.jobs);
    into.inserted.extend(from.inserted);
    into.tombstones.extend(from.tombstones);
    into.forgotten.extend(from.forgotten);
    into.tube_ttls.extend(from.tube_ttls);
}

/// True if the peer has hung up (checked without consuming input).
fn peer_closed(stream: &mut Stream) -> bool {
    match stream {
        Stream::Tcp(s) => sys::peer_closed(&*s),
        Stream::Unix(s) => sys::peer_closed(&*s),
        Stream::Tls(s) => sys::peer_closed(s.socket()),
    }
}

fn register_listener(registry: &Registry, listener: &mut Listener, token: Token) -> io::Result<()> {
    match listener {
        Listener::Tcp(l) => registry.register(l, token, Interest::READABLE),
        Listener::Unix(l) => registry.register(l, token, Interest::READABLE),
    }
}

fn open_tcp_listener(host: &str, port: u16, backlog: i32) -> anyhow::Result<(Listener, String)> {
    let addr = (host, port)
        .to_socket_addrs()
        .with_context(|| format!("resolving listen address {host}:{port}"))?
        .next()
        .with_context(|| format!("no address for {host}"))?;
    let std_listener = sys::tcp_listener(addr, backlog).with_context(|| format!("binding {addr}"))?;
    let local = std_listener.local_addr()?.to_string();
    Ok((Listener::Tcp(TcpListener::from_std(std_listener)), local))
}

fn open_listener(listen: &Listen, backlog: i32) -> anyhow::Result<(Listener, String)> {
    if let Some(inherited) = sys::systemd_listener() {
        let fd = sys::LISTEN_FDS_START;
        let inherited = inherited.map_err(|e| anyhow::anyhow!("LISTEN_FDS: fd {fd} is not a socket: {e}"))?;
        return listener_from_inherited(inherited);
    }
    match listen {
        Listen::Tcp { host, port } => open_tcp_listener(host, *port, backlog),
        Listen::Unix(path) => {
            if let Ok(meta) = std::fs::symlink_metadata(path) {
                use std::os::unix::fs::FileTypeExt;
                if !meta.file_type().is_socket() {
                    bail!("{} exists and is not a socket", path.display());
                }
                std::fs::remove_file(path).with_context(|| format!("removing stale socket {}", path.display()))?;
            }
            let l = UnixListener::bind(path).with_context(|| format!("binding unix socket {}", path.display()))?;
            Ok((Listener::Unix(l), format!("unix:{}", path.display())))
        }
    }
}

fn listener_from_inherited(inherited: sys::InheritedListener) -> anyhow::Result<(Listener, String)> {
    match inherited {
        sys::InheritedListener::Unix(l) => {
            l.set_nonblocking(true)?;
            let name =
                l.local_addr().ok().and_then(|a| a.as_pathname().map(|p| p.display().to_string())).unwrap_or_default();
            Ok((Listener::Unix(UnixListener::from_std(l)), format!("unix:{name}")))
        }
        sys::InheritedListener::Tcp(l) => {
            l.set_nonblocking(true)?;
            let local = l.local_addr()?.to_string();
            Ok((Listener::Tcp(TcpListener::from_std(l)), local))
        }
    }
}

fn install_signals(registry: &Registry) -> anyhow::Result<Signals> {
    use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
    let shutdown = Arc::new(AtomicBool::new(false));
    let drain = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(SIGTERM, Arc::clone(&shutdown))?;
    signal_hook::flag::register(SIGINT, Arc::clone(&shutdown))?;
    signal_hook::flag::register(SIGUSR1, Arc::clone(&drain))?;
    let (read_end, write_end) = std::os::unix::net::UnixStream::pair().context("creating the signal pipe")?;
    read_end.set_nonblocking(true)?;
    write_end.set_nonblocking(true)?;
    for sig in [SIGTERM, SIGINT, SIGUSR1] {
        signal_hook::low_level::pipe::register(sig, write_end.try_clone()?)?;
    }
    let mut wake = UnixStream::from_std(read_end);
    registry.register(&mut wake, SIGNALS, Interest::READABLE)?;
    sys::ignore_sigpipe();
    Ok(Signals { shutdown, drain, wake })
}

fn instance_info() -> engine::Instance {
    let uts = sys::uname();
    let random = uuid::Uuid::new_v4();
    engine::Instance {
        pid: std::process::id(),
        id: hex::encode(&random.as_bytes()[..8]),
        hostname: uts.hostname,
        os: uts.os,
        platform: uts.machine,
        // What beanstalkd 1.12 answers: client libraries parse this field as a version
        // number. polarisd's own version is in `polaris-stats` and `polarisd -v`.
        version: "1.12".into(),
        server_version: env!("CARGO_PKG_VERSION").into(),
    }
}

fn rusage() -> engine::Rusage {
    let (user, system) = sys::cpu_times();
    ((user.as_secs(), user.subsec_micros()), (system.as_secs(), system.subsec_micros()))
}

/// Runs `polarisd` with `cfg`: binds, prints `listening on ADDR` first on
/// stdout, tells systemd it is ready (`$NOTIFY_SOCKET`), serves until SIGTERM/SIGINT.
pub fn run(cfg: ServerConfig) -> anyhow::Result<()> {
    let mut server = Server::bind(cfg)?;
    println!("listening on {}", server.local_addr());
    if let Some(addr) = server.tls_local_addr() {
        println!("listening for TLS on {addr}");
    }
    if let Some(addr) = server.metrics_addr() {
        println!("metrics on http://{addr}/metrics");
    }
    let _ = io::stdout().flush();
    log::info!("listening on {}", server.local_addr());
    // Ready once the listener is bound and the store loaded (Type=notify units); a service
    // manager that cannot be told is no reason to stop serving.
    if let Err(e) = sys::notify_ready() {
        log::warn!("could not notify the service manager ($NOTIFY_SOCKET): {e}");
    }
    server.run()
}
