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
//! 3. commit the turn's changes in one transaction (group commit);
//! 4. write out every connection's pending replies.

use crate::store::{Durability, Store, StoreError};
use crate::sys;
use anyhow::{bail, Context};
use bytes::{Buf, BytesMut};
use mio::event::Source;
use mio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use mio::{Events, Interest, Poll, Registry, Token};
use polaris_engine::{self as engine, ConnId, Engine, Nanos, Outcome, ReplySink};
use polaris_proto::{Decoder, Limits};
use slab::Slab;
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
    /// Most simultaneous connections.
    pub max_connections: usize,
    /// Framing limits.
    pub limits: Limits,
    /// Most reply bytes queued for one connection before its input is paused.
    pub max_output_buffer: usize,
    /// Persistence; `None` keeps jobs in memory only.
    pub durability: Option<Durability>,
    /// User to switch to after binding.
    pub user: Option<String>,
    /// Queue settings.
    pub engine: engine::Config,
}

const LISTENER: Token = Token(usize::MAX - 1);
const SIGNALS: Token = Token(usize::MAX - 2);
/// How much to read from a socket at a time.
const READ_CHUNK: usize = 64 * 1024;
/// Connection buffers that grew past this (for a big job) are given back once empty.
const SHRINK_ABOVE: usize = 1 << 20;

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// A client socket of either kind.
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
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
        }
    }
    fn reregister(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.reregister(r, t, i),
            Stream::Unix(s) => s.reregister(r, t, i),
        }
    }
    fn deregister(&mut self, r: &Registry) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.deregister(r),
            Stream::Unix(s) => s.deregister(r),
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
    /// Length of `output` before this turn's replies: what a failed commit takes back.
    turn_start: usize,
}

/// Replies from the engine go straight into connection output buffers.
struct Outbox<'a> {
    conns: &'a mut Slab<Connection>,
    tokens: &'a [usize],
    flush: &'a mut Vec<usize>,
    resumed: &'a mut Vec<usize>,
}

impl ReplySink for Outbox<'_> {
    fn send(&mut self, conn: ConnId, bytes: &[u8]) {
        let token = self.tokens[conn.0];
        let Some(c) = self.conns.get_mut(token) else { return };
        if !c.queued_for_flush {
            c.queued_for_flush = true;
            c.turn_start = c.output.len();
            self.flush.push(token);
        }
        c.output.extend_from_slice(bytes);
        if c.blocked {
            c.blocked = false;
            self.resumed.push(token);
        }
    }
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
    listener: Listener,
    conns: Slab<Connection>,
    /// Engine connection id -> slab token.
    tokens: Vec<usize>,
    engine: Engine,
    store: Option<Store>,
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
    /// Read buffer shared by all connections; bytes are copied into the
    /// connection's own input only as far as they were read.
    scratch: Box<[u8]>,
}

impl Server {
    /// Opens the store (if any), binds the listener and prepares the loop.
    pub fn bind(cfg: ServerConfig) -> anyhow::Result<Server> {
        let poll = Poll::new().context("creating the poll instance")?;
        let (mut listener, local_addr) = open_listener(&cfg.listen)?;
        match &mut listener {
            Listener::Tcp(l) => poll.registry().register(l, LISTENER, Interest::READABLE)?,
            Listener::Unix(l) => poll.registry().register(l, LISTENER, Interest::READABLE)?,
        }
        if let Some(user) = &cfg.user {
            sys::become_user(user)?;
        }
        let started = Instant::now();
        let mut engine_cfg = cfg.engine.clone();
        engine_cfg.instance = instance_info();
        engine_cfg.rusage = rusage;
        let mut engine = Engine::new(engine_cfg, CLOCK_ORIGIN, cfg.durability.is_some());
        let store = match &cfg.durability {
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
        Ok(Server {
            poll,
            listener,
            conns: Slab::new(),
            tokens: Vec::new(),
            engine,
            store,
            cfg,
            started,
            signals,
            flush: Vec::new(),
            resumed: Vec::new(),
            backlog: Vec::new(),
            to_close: Vec::new(),
            local_addr,
            scratch: vec![0; READ_CHUNK].into_boxed_slice(),
        })
    }

    /// The address clients connect to (`host:port` or `unix:/path`).
    pub fn local_addr(&self) -> &str {
        &self.local_addr
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
            let now = self.now();
            self.with_outbox(|engine, out| engine.tick(now, out));
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept_all(),
                    SIGNALS => self.drain_signal_pipe(),
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
            self.commit(now);
            self.flush_all();
            self.close_pending(now);
            if self.signals.shutdown.load(Ordering::Relaxed) {
                log::info!("shutting down");
                self.commit(self.now());
                self.flush_all();
                if let Some(store) = &mut self.store {
                    store.sync().context("final sync")?;
                }
                return Ok(());
            }
        }
    }

    fn poll_timeout(&self) -> Option<Duration> {
        if !self.backlog.is_empty() || !self.resumed.is_empty() {
            return Some(Duration::ZERO);
        }
        let now = self.now();
        let timeout = self.engine.next_deadline().map(|d| Duration::from_nanos(d.saturating_sub(now)));
        // Round up so a timer is never woken for a fraction too early.
        timeout.map(|t| t + Duration::from_micros(100))
    }

    fn with_outbox<R>(&mut self, f: impl FnOnce(&mut Engine, &mut Outbox<'_>) -> R) -> R {
        let mut out =
            Outbox { conns: &mut self.conns, tokens: &self.tokens, flush: &mut self.flush, resumed: &mut self.resumed };
        f(&mut self.engine, &mut out)
    }

    fn accept_all(&mut self) {
        loop {
            let accepted = match &self.listener {
                Listener::Tcp(l) => l.accept().map(|(s, _)| {
                    // Replies are small and latency matters more than packet count.
                    let _ = s.set_nodelay(true);
                    Stream::Tcp(s)
                }),
                Listener::Unix(l) => l.accept().map(|(s, _)| Stream::Unix(s)),
            };
            let mut stream = match accepted {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of file descriptors, typically: keep serving the others.
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
                turn_start: 0,
            });
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
                    // (Not after a hang-up: its edge is spent, so read to the end.)
                    let drained = n < self.scratch.len() && !c.peer_hup;
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
            let outcome = self.with_outbox(|engine, out| engine.feed(conn, decoded, now, out));
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
            if !c.queued_for_flush && !c.output.is_empty() {
                c.queued_for_flush = true;
                c.turn_start = c.output.len();
                self.flush.push(token);
            }
        }
    }

    /// Group commit: one transaction for everything this turn changed.
    fn commit(&mut self, now: Nanos) {
        let Some(store) = &mut self.store else { return };
        let changes = self.engine.take_changes();
        if let Err(e) = store.commit(&changes, &self.engine, now) {
            let inserted: Vec<engine::JobId> = changes.inserted.iter().copied().collect();
            self.commit_failed(e, &inserted);
        }
        self.engine.set_binlog_stats(self.store.as_ref().map(|s| s.stats()).unwrap_or_default());
    }

    /// A failed commit must not acknowledge anything: every reply produced this
    /// turn is replaced by `INTERNAL_ERROR`, jobs created this turn are dropped
    /// (nobody was told they exist), and the other changes stay queued in the
    /// store for the next commit, so nothing acknowledged earlier is lost.
    fn commit_failed(&mut self, e: StoreError, inserted: &[engine::JobId]) {
        log::error!("commit failed: {e}");
        self.engine.discard_jobs(inserted);
        for &token in &self.flush {
            if let Some(c) = self.conns.get_mut(token) {
                if c.output.len() > c.turn_start {
                    c.output.truncate(c.turn_start);
                    c.output.extend_from_slice(polaris_proto::reply::INTERNAL_ERROR);
                }
            }
        }
    }

    fn flush_all(&mut self) {
        let tokens = std::mem::take(&mut self.flush);
        for token in tokens {
            let Some(c) = self.conns.get_mut(token) else { continue };
            c.queued_for_flush = false;
            while !c.output.is_empty() {
                match c.stream.write(&c.output) {
                    Ok(0) => {
                        c.closing = true;
                        self.to_close.push(token);
                        break;
                    }
                    Ok(n) => c.output.advance(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        log::debug!("write error on connection {token}: {e}");
                        c.output.clear();
                        c.closing = true;
                        self.to_close.push(token);
                        break;
                    }
                }
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

    fn close_pending(&mut self, now: Nanos) {
        while let Some(token) = self.to_close.pop() {
            let Some(c) = self.conns.get(token) else { continue };
            // Give a closing connection one chance to receive what it was sent.
            if !c.output.is_empty() && !c.blocked {
                let c = &mut self.conns[token];
                let _ = c.stream.write(&c.output);
            }
            let mut c = self.conns.remove(token);
            let _ = self.poll.registry().deregister(&mut c.stream);
            let conn = c.engine_id;
            self.with_outbox(|engine, out| engine.disconnect(conn, now, out));
            self.tokens[conn.0] = usize::MAX;
        }
        // Disconnects may have woken waiters on other connections.
        if !self.resumed.is_empty() || !self.flush.is_empty() {
            self.run_backlog(now);
            self.commit(now);
            self.flush_all();
        }
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

/// True if the peer has hung up (checked without consuming input).
fn peer_closed(stream: &mut Stream) -> bool {
    match stream {
        Stream::Tcp(s) => sys::peer_closed(&*s),
        Stream::Unix(s) => sys::peer_closed(&*s),
    }
}

fn open_listener(listen: &Listen) -> anyhow::Result<(Listener, String)> {
    if let Some(inherited) = sys::systemd_listener() {
        let fd = sys::LISTEN_FDS_START;
        let inherited = inherited.map_err(|e| anyhow::anyhow!("LISTEN_FDS: fd {fd} is not a socket: {e}"))?;
        return listener_from_inherited(inherited);
    }
    match listen {
        Listen::Tcp { host, port } => {
            let addr = (host.as_str(), *port)
                .to_socket_addrs()
                .with_context(|| format!("resolving listen address {host}:{port}"))?
                .next()
                .with_context(|| format!("no address for {host}"))?;
            let std_listener = std::net::TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
            std_listener.set_nonblocking(true)?;
            let local = std_listener.local_addr()?.to_string();
            Ok((Listener::Tcp(TcpListener::from_std(std_listener)), local))
        }
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
/// stdout, serves until SIGTERM/SIGINT.
pub fn run(cfg: ServerConfig) -> anyhow::Result<()> {
    let mut server = Server::bind(cfg)?;
    println!("listening on {}", server.local_addr());
    let _ = io::stdout().flush();
    log::info!("listening on {}", server.local_addr());
    server.run()
}
