//! A small blocking client for the beanstalk protocol (beanstalkd 1.12 and `polarisd`).
//!
//! One [`Client`] owns one TCP connection, plain or (with the `tls` feature,
//! [`Client::connect_tls`]) TLS. Every method sends one command and reads its
//! reply; server error replies become [`Error`] variants, so callers can match on
//! `Error::NotFound` or `Error::JobTooBig` instead of comparing strings.
//!
//! Commands are assembled from validated pieces only: tube names are checked against the
//! protocol's alphabet before they are written, so no caller-controlled string can inject a
//! second command line.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Longest reply line we accept from a server before calling it a protocol error. Real
/// replies are far shorter (`RESERVED <id> <bytes>` is under 50 bytes).
const MAX_REPLY_LINE: usize = 1024;

/// What can go wrong talking to a beanstalk server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The connection failed, timed out or broke.
    #[error("queue I/O error: {0}")]
    Io(#[from] io::Error),
    /// The server closed the connection in the middle of a reply.
    #[error("queue closed the connection")]
    Closed,
    /// `OUT_OF_MEMORY`: the server could not allocate memory for the job.
    #[error("queue is out of memory (OUT_OF_MEMORY)")]
    OutOfMemory,
    /// `INTERNAL_ERROR`: a bug in the server.
    #[error("queue reported an internal error (INTERNAL_ERROR)")]
    InternalError,
    /// `BAD_FORMAT`: the server could not parse the command.
    #[error("queue rejected the command format (BAD_FORMAT)")]
    BadFormat,
    /// `UNKNOWN_COMMAND`: the server does not know the command (e.g. an extension).
    #[error("queue does not know the command (UNKNOWN_COMMAND)")]
    UnknownCommand,
    /// `EXPECTED_CRLF`: the job body was not followed by `\r\n`.
    #[error("queue expected CRLF after the job body (EXPECTED_CRLF)")]
    ExpectedCrlf,
    /// `JOB_TOO_BIG`: the body is larger than the server's max job size (`-z`).
    #[error("job body is larger than the queue's max job size (JOB_TOO_BIG)")]
    JobTooBig,
    /// `DRAINING`: the server is in drain mode and accepts no new jobs.
    #[error("queue is draining and accepts no new jobs (DRAINING)")]
    Draining,
    /// `BURIED <id>`: the job was stored but buried (server out of memory for its heap),
    /// or a `release` could not put it back.
    #[error("job {0} was buried by the queue")]
    Buried(u64),
    /// `NOT_FOUND`: no such job (or not reserved by this connection), or no such tube.
    #[error("no such job or tube (NOT_FOUND)")]
    NotFound,
    /// `DEADLINE_SOON`: a job reserved by this connection is about to reach its TTR.
    #[error("a reserved job is about to reach its TTR (DEADLINE_SOON)")]
    DeadlineSoon,
    /// `NOT_IGNORED`: the connection cannot ignore its last watched tube.
    #[error("cannot ignore the only watched tube (NOT_IGNORED)")]
    NotIgnored,
    /// The tube name is empty, too long or has characters the protocol does not allow.
    #[error("invalid tube name {0:?}")]
    InvalidTubeName(String),
    /// The server answered something this client does not understand.
    #[error("unexpected reply to {command}: {reply:?}")]
    UnexpectedReply {
        /// The command that was sent (its verb only).
        command: &'static str,
        /// The reply line, without `\r\n`.
        reply: String,
    },
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

/// A job as handed out by `reserve` or `peek`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// The server's job id.
    pub id: u64,
    /// The job body, exactly as put.
    pub body: Vec<u8>,
}

/// Outcome of the `revoke` extension of `polarisd` for a job that exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevokeOutcome {
    /// `REVOKED`: the job will never be handed out.
    Revoked,
    /// The job is reserved by a worker and cannot be revoked any more.
    Reserved,
}

/// The YAML dictionary returned by `stats`, `stats-job` and `stats-tube`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats(pub BTreeMap<String, String>);

impl Stats {
    /// The raw value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// The value of `key` parsed as an unsigned number, if present and numeric.
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(|v| v.parse().ok())
    }

    /// Parses the flat `key: value` YAML the protocol uses. Lines that are not
    /// `key: value` (the `---` header) are skipped; quotes around values are removed.
    pub fn parse(yaml: &str) -> Stats {
        let mut map = BTreeMap::new();
        for line in yaml.lines() {
            if let Some((key, value)) = line.split_once(": ") {
                let value = value.trim().trim_matches('"');
                map.insert(key.trim().to_string(), value.to_string());
            }
        }
        Stats(map)
    }
}

/// Whether `name` is a tube name the protocol accepts (see [`crate::is_valid_tube_name`]).
pub fn is_valid_tube_name(name: &str) -> bool {
    crate::is_valid_tube_name(name.as_bytes())
}

fn check_tube(name: &str) -> Result<&str> {
    if is_valid_tube_name(name) {
        Ok(name)
    } else {
        Err(Error::InvalidTubeName(name.to_string()))
    }
}

/// The connection under a [`Client`]: a TCP socket, or TLS over one.
enum Conn {
    Plain(TcpStream),
    #[cfg(feature = "tls")]
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Conn {
    fn tcp(&self) -> &TcpStream {
        match self {
            Conn::Plain(s) => s,
            #[cfg(feature = "tls")]
            Conn::Tls(s) => s.get_ref(),
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            // A peer that closes without TLS's close_notify (a killed server) is, for this
            // client, a closed connection like any other: a cut reply is still caught by
            // the framing (a line without CRLF, a short body).
            #[cfg(feature = "tls")]
            Conn::Tls(s) => match s.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(0),
                other => other,
            },
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            #[cfg(feature = "tls")]
            Conn::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            #[cfg(feature = "tls")]
            Conn::Tls(s) => s.flush(),
        }
    }
}

#[cfg(feature = "tls")]
pub use crate::tls::{TlsClientConfig, TlsClientFiles, TlsSetupError};

/// Where a client connects: an address and, with the `tls` feature, optionally the TLS
/// settings to connect with. The dispatcher and the agent keep one and reconnect with it.
#[derive(Clone, Debug)]
pub struct Endpoint {
    addr: String,
    #[cfg(feature = "tls")]
    tls: Option<TlsClientConfig>,
}

impl Endpoint {
    /// Plain TCP to `addr` (`host:port`).
    pub fn plain(addr: &str) -> Endpoint {
        Endpoint {
            addr: addr.to_string(),
            #[cfg(feature = "tls")]
            tls: None,
        }
    }

    /// TLS to `addr` with `tls`.
    #[cfg(feature = "tls")]
    pub fn tls(addr: &str, tls: TlsClientConfig) -> Endpoint {
        Endpoint { addr: addr.to_string(), tls: Some(tls) }
    }

    /// `addr`, over TLS when `tls` is given: what the `--queue` and `--queue-ca` (etc.)
    /// flags of the dispatcher and the agent describe. The files are read now.
    #[cfg(feature = "tls")]
    pub fn from_flags(addr: &str, tls: Option<&TlsClientFiles>) -> std::result::Result<Endpoint, TlsSetupError> {
        Ok(match tls {
            Some(files) => Endpoint::tls(addr, files.load(addr)?),
            None => Endpoint::plain(addr),
        })
    }

    /// The `host:port` address.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Whether connections are TLS.
    pub fn is_tls(&self) -> bool {
        #[cfg(feature = "tls")]
        return self.tls.is_some();
        #[cfg(not(feature = "tls"))]
        return false;
    }

    /// Opens a connection ([`Client::connect`] or [`Client::connect_tls`]).
    pub fn connect(&self, connect_timeout: Duration) -> Result<Client> {
        #[cfg(feature = "tls")]
        if let Some(tls) = &self.tls {
            return Client::connect_tls(&self.addr, tls, connect_timeout);
        }
        Client::connect(&self.addr, connect_timeout)
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_tls() {
            write!(f, "{} (TLS)", self.addr)
        } else {
            f.write_str(&self.addr)
        }
    }
}

/// A blocking connection to a beanstalk server.
pub struct Client {
    /// Reads are buffered; writes go straight to the connection (`get_mut`).
    stream: BufReader<Conn>,
    /// Read timeout for replies that should come at once; `None` waits forever.
    io_timeout: Option<Duration>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("peer", &self.stream.get_ref().tcp().peer_addr().ok())
            .field("tls", &!matches!(self.stream.get_ref(), Conn::Plain(_)))
            .finish()
    }
}

/// Connects a TCP socket to the first address of `addr` that answers within `timeout`.
fn connect_tcp(addr: &str, connect_timeout: Duration) -> Result<TcpStream> {
    let mut last_err = io::Error::new(io::ErrorKind::InvalidInput, format!("{addr}: resolves to no address"));
    for sock_addr in addr.to_socket_addrs()? {
        match TcpStream::connect_timeout(&sock_addr, connect_timeout) {
            Ok(stream) => return Ok(stream),
            Err(e) => last_err = io::Error::new(e.kind(), format!("connect to {sock_addr}: {e}")),
        }
    }
    Err(Error::Io(last_err))
}

impl Client {
    /// Connects to `addr` (e.g. `127.0.0.1:11300`), waiting at most `connect_timeout` per
    /// resolved address. Replies to ordinary commands must arrive within 30 seconds.
    pub fn connect(addr: &str, connect_timeout: Duration) -> Result<Client> {
        Client::from_stream(connect_tcp(addr, connect_timeout)?)
    }

    /// Connects to `addr` over TLS: the server's certificate must chain to the config's CA
    /// and carry its server name; the client presents its own certificate if the config has
    /// one. The handshake completes here (within the connect timeout), so a server that does
    /// not speak TLS or whose certificate does not verify fails now, not at the first command.
    /// (With TLS 1.3 a server that refuses the client's certificate says so only at the
    /// first command's reply.)
    #[cfg(feature = "tls")]
    pub fn connect_tls(addr: &str, tls: &crate::tls::TlsClientConfig, connect_timeout: Duration) -> Result<Client> {
        let mut socket = connect_tcp(addr, connect_timeout)?;
        socket.set_nodelay(true)?;
        socket.set_read_timeout(Some(connect_timeout))?;
        socket.set_write_timeout(Some(connect_timeout))?;
        let mut session =
            tls.session().map_err(|e| Error::Io(io::Error::new(io::ErrorKind::InvalidInput, e.to_string())))?;
        while session.is_handshaking() {
            session
                .complete_io(&mut socket)
                .map_err(|e| Error::Io(io::Error::new(e.kind(), format!("TLS handshake with {addr}: {e}"))))?;
        }
        Client::from_conn(Conn::Tls(Box::new(rustls::StreamOwned::new(session, socket))))
    }

    /// Wraps an already connected stream.
    pub fn from_stream(stream: TcpStream) -> Result<Client> {
        stream.set_nodelay(true)?;
        Client::from_conn(Conn::Plain(stream))
    }

    fn from_conn(conn: Conn) -> Result<Client> {
        let mut client = Client { stream: BufReader::new(conn), io_timeout: None };
        client.set_io_timeout(Some(Duration::from_secs(30)))?;
        Ok(client)
    }

    /// Whether the connection is TLS.
    pub fn is_tls(&self) -> bool {
        !matches!(self.stream.get_ref(), Conn::Plain(_))
    }

    /// Sets how long to wait for the reply to a command that should answer at once
    /// (everything but `reserve`). `None` waits forever.
    pub fn set_io_timeout(&mut self, timeout: Option<Duration>) -> Result<()> {
        self.io_timeout = timeout;
        self.set_read_timeout(timeout)?;
        self.stream.get_ref().tcp().set_write_timeout(timeout)?;
        Ok(())
    }

    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.stream.get_ref().tcp().set_read_timeout(timeout)
    }

    /// Writes one whole command (with its body, if any).
    fn send(&mut self, bytes: &[u8]) -> Result<()> {
        let conn = self.stream.get_mut();
        conn.write_all(bytes)?;
        conn.flush()?;
        Ok(())
    }

    /// `put <pri> <delay> <ttr> <bytes>`: stores a job in the used tube and returns its id.
    pub fn put(&mut self, priority: u32, delay: u32, ttr: u32, body: &[u8]) -> Result<u64> {
        let mut msg = format!("put {priority} {delay} {ttr} {}\r\n", body.len()).into_bytes();
        msg.extend_from_slice(body);
        msg.extend_from_slice(b"\r\n");
        self.send(&msg)?;
        let line = self.read_line()?;
        let words: Vec<&str> = line.split(' ').collect();
        match words.as_slice() {
            ["INSERTED", id] => parse_id("put", id, &line),
            ["BURIED", id] => Err(Error::Buried(parse_id("put", id, &line)?)),
            _ => Err(self.error_reply("put", line)),
        }
    }

    /// `put` with the `polarisd` TTL extension: the job expires in the queue if
    /// nobody reserves it within `ttl` seconds. beanstalkd answers `BAD_FORMAT`
    /// ([`Error::BadFormat`]); check [`Client::supports_extensions`] first.
    pub fn put_with_ttl(&mut self, priority: u32, delay: u32, ttr: u32, ttl: u32, body: &[u8]) -> Result<u64> {
        let mut msg = format!("put {priority} {delay} {ttr} {} ttl={ttl}\r\n", body.len()).into_bytes();
        msg.extend_from_slice(body);
        msg.extend_from_slice(b"\r\n");
        self.send(&msg)?;
        let line = self.read_line()?;
        match line.strip_prefix("INSERTED ") {
            Some(id) => parse_id("put", id, &line),
            None => {
                // beanstalkd reads the body of a refused put as a command line and
                // answers it too: consume that reply so the connection stays in step.
                let err = self.error_reply("put", line);
                if matches!(err, Error::BadFormat) {
                    let _ = self.read_line();
                }
                Err(err)
            }
        }
    }

    /// `polaris-stats` (a `polarisd` extension): counters beanstalk has no
    /// field for, such as `jobs-expired`. beanstalkd answers [`Error::UnknownCommand`].
    pub fn polaris_stats(&mut self) -> Result<Stats> {
        self.yaml_command("polaris-stats", "polaris-stats\r\n")
    }

    /// Whether the server speaks the `polarisd` extensions (TTL, `revoke`,
    /// `job-state`): asks `polaris-stats`, which beanstalkd does not know.
    pub fn supports_extensions(&mut self) -> Result<bool> {
        match self.polaris_stats() {
            Ok(_) => Ok(true),
            Err(Error::UnknownCommand) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// `job-state <id>` (a `polarisd` extension): the live state (`ready`,
    /// `delayed`, `reserved`, `buried`) or final state (`success`, `failed`,
    /// `revoked`, `expired`) of a job; [`Error::NotFound`] once forgotten.
    pub fn job_state(&mut self, id: u64) -> Result<String> {
        let line = self.command(&format!("job-state {id}\r\n"))?;
        match line.strip_prefix("STATE ") {
            Some(state) => Ok(state.to_string()),
            None => Err(self.error_reply("job-state", line)),
        }
    }

    /// `use <tube>`: later `put`s go to `tube`.
    pub fn use_tube(&mut self, tube: &str) -> Result<()> {
        let line = self.command(&format!("use {}\r\n", check_tube(tube)?))?;
        match line.strip_prefix("USING ") {
            Some(_) => Ok(()),
            None => Err(self.error_reply("use", line)),
        }
    }

    /// `watch <tube>`: adds `tube` to the watch list; returns how many tubes are watched.
    pub fn watch(&mut self, tube: &str) -> Result<u32> {
        let line = self.command(&format!("watch {}\r\n", check_tube(tube)?))?;
        self.watching_count("watch", line)
    }

    /// `ignore <tube>`: removes `tube` from the watch list; returns how many are left.
    pub fn ignore(&mut self, tube: &str) -> Result<u32> {
        let line = self.command(&format!("ignore {}\r\n", check_tube(tube)?))?;
        self.watching_count("ignore", line)
    }

    /// `reserve`: waits, without limit, for a job from a watched tube.
    pub fn reserve(&mut self) -> Result<Job> {
        self.set_read_timeout(None)?;
        let result = self.command("reserve\r\n");
        self.set_read_timeout(self.io_timeout)?;
        self.reserved_job("reserve", result?)
    }

    /// `reserve-with-timeout <secs>`: waits up to `secs` for a job; `Ok(None)` on `TIMED_OUT`.
    pub fn reserve_with_timeout(&mut self, secs: u32) -> Result<Option<Job>> {
        // The reply may legitimately take `secs`; allow that on top of the usual I/O timeout.
        let wait = self.io_timeout.map(|t| t + Duration::from_secs(u64::from(secs)));
        self.set_read_timeout(wait)?;
        let result = self.command(&format!("reserve-with-timeout {secs}\r\n"));
        self.set_read_timeout(self.io_timeout)?;
        let line = result?;
        if line == "TIMED_OUT" {
            return Ok(None);
        }
        self.reserved_job("reserve-with-timeout", line).map(Some)
    }

    /// `delete <id>`: removes a job reserved by this connection, or any ready, delayed or
    /// buried job.
    pub fn delete(&mut self, id: u64) -> Result<()> {
        self.expect_exact("delete", &format!("delete {id}\r\n"), "DELETED")
    }

    /// `release <id> <pri> <delay>`: puts a job reserved by this connection back.
    pub fn release(&mut self, id: u64, priority: u32, delay: u32) -> Result<()> {
        let line = self.command(&format!("release {id} {priority} {delay}\r\n"))?;
        match line.as_str() {
            "RELEASED" => Ok(()),
            "BURIED" => Err(Error::Buried(id)),
            _ => Err(self.error_reply("release", line)),
        }
    }

    /// `bury <id> <pri>`: moves a job reserved by this connection to the buried list.
    pub fn bury(&mut self, id: u64, priority: u32) -> Result<()> {
        self.expect_exact("bury", &format!("bury {id} {priority}\r\n"), "BURIED")
    }

    /// `touch <id>`: gives a job reserved by this connection a fresh TTR.
    pub fn touch(&mut self, id: u64) -> Result<()> {
        self.expect_exact("touch", &format!("touch {id}\r\n"), "TOUCHED")
    }

    /// `kick <bound>`: kicks up to `bound` buried (else delayed) jobs of the used tube;
    /// returns how many were kicked.
    pub fn kick(&mut self, bound: u64) -> Result<u64> {
        let line = self.command(&format!("kick {bound}\r\n"))?;
        match line.strip_prefix("KICKED ") {
            Some(n) => parse_id("kick", n, &line),
            None => Err(self.error_reply("kick", line)),
        }
    }

    /// `kick-job <id>`: kicks one buried or delayed job.
    pub fn kick_job(&mut self, id: u64) -> Result<()> {
        self.expect_exact("kick-job", &format!("kick-job {id}\r\n"), "KICKED")
    }

    /// `peek <id>`: the job with this id, in any state.
    pub fn peek(&mut self, id: u64) -> Result<Job> {
        self.peek_command("peek", &format!("peek {id}\r\n"))
    }

    /// `peek-ready`: the next ready job of the used tube, if any.
    pub fn peek_ready(&mut self) -> Result<Option<Job>> {
        optional(self.peek_command("peek-ready", "peek-ready\r\n"))
    }

    /// `peek-delayed`: the delayed job of the used tube closest to ready, if any.
    pub fn peek_delayed(&mut self) -> Result<Option<Job>> {
        optional(self.peek_command("peek-delayed", "peek-delayed\r\n"))
    }

    /// `peek-buried`: the oldest buried job of the used tube, if any.
    pub fn peek_buried(&mut self) -> Result<Option<Job>> {
        optional(self.peek_command("peek-buried", "peek-buried\r\n"))
    }

    /// `stats-job <id>`: the job's state, tube, priority, TTR, counters.
    pub fn stats_job(&mut self, id: u64) -> Result<Stats> {
        self.yaml_command("stats-job", &format!("stats-job {id}\r\n"))
    }

    /// `stats-tube <tube>`: the tube's job counts by state, watchers, pause.
    pub fn stats_tube(&mut self, tube: &str) -> Result<Stats> {
        self.yaml_command("stats-tube", &format!("stats-tube {}\r\n", check_tube(tube)?))
    }

    /// `stats`: server-wide statistics, among them `max-job-size`.
    pub fn stats(&mut self) -> Result<Stats> {
        self.yaml_command("stats", "stats\r\n")
    }

    /// `revoke <id>`: the `polarisd` extension that cancels a job that is not reserved.
    /// beanstalkd answers [`Error::UnknownCommand`]; `NOT_FOUND` is [`Error::NotFound`].
    pub fn revoke(&mut self, id: u64) -> Result<RevokeOutcome> {
        let line = self.command(&format!("revoke {id}\r\n"))?;
        match line.as_str() {
            "REVOKED" => Ok(RevokeOutcome::Revoked),
            "NOT_REVOKED" => Ok(RevokeOutcome::Reserved),
            _ => Err(self.error_reply("revoke", line)),
        }
    }

    fn watching_count(&self, command: &'static str, line: String) -> Result<u32> {
        match line.strip_prefix("WATCHING ").map(str::parse::<u32>) {
            Some(Ok(n)) => Ok(n),
            _ => Err(self.error_reply(command, line)),
        }
    }

    fn expect_exact(&mut self, command: &'static str, msg: &str, ok: &str) -> Result<()> {
        let line = self.command(msg)?;
        if line == ok {
            Ok(())
        } else {
            Err(self.error_reply(command, line))
        }
    }

    fn peek_command(&mut self, command: &'static str, msg: &str) -> Result<Job> {
        let line = self.command(msg)?;
        let words: Vec<&str> = line.split(' ').collect();
        match words.as_slice() {
            ["FOUND", id, len] => {
                let id = parse_id(command, id, &line)?;
                let len = parse_len(command, len, &line)?;
                Ok(Job { id, body: self.read_body(len)? })
            }
            _ => Err(self.error_reply(command, line)),
        }
    }

    fn reserved_job(&mut self, command: &'static str, line: String) -> Result<Job> {
        let words: Vec<&str> = line.split(' ').collect();
        match words.as_slice() {
            ["RESERVED", id, len] => {
                let id = parse_id(command, id, &line)?;
                let len = parse_len(command, len, &line)?;
                Ok(Job { id, body: self.read_body(len)? })
            }
            _ => Err(self.error_reply(command, line)),
        }
    }

    fn yaml_command(&mut self, command: &'static str, msg: &str) -> Result<Stats> {
        let line = self.command(msg)?;
        match line.strip_prefix("OK ") {
            Some(len) => {
                let len = parse_len(command, len, &line)?;
                let body = self.read_body(len)?;
                Ok(Stats::parse(&String::from_utf8_lossy(&body)))
            }
            None => Err(self.error_reply(command, line)),
        }
    }

    /// Sends `msg` and reads one reply line.
    fn command(&mut self, msg: &str) -> Result<String> {
        self.send(msg.as_bytes())?;
        self.read_line()
    }

    fn read_line(&mut self) -> Result<String> {
        let mut buf = Vec::with_capacity(64);
        let n = (&mut self.stream).take(MAX_REPLY_LINE as u64).read_until(b'\n', &mut buf)?;
        if n == 0 {
            return Err(Error::Closed);
        }
        if !buf.ends_with(b"\r\n") {
            return Err(Error::UnexpectedReply {
                command: "(reply line)",
                reply: String::from_utf8_lossy(&buf).into_owned(),
            });
        }
        buf.truncate(buf.len() - 2);
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    fn read_body(&mut self, len: usize) -> Result<Vec<u8>> {
        let mut body = vec![0u8; len + 2];
        self.stream.read_exact(&mut body).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                Error::Closed
            } else {
                Error::Io(e)
            }
        })?;
        if !body.ends_with(b"\r\n") {
            return Err(Error::UnexpectedReply { command: "(job body)", reply: "body not followed by CRLF".into() });
        }
        body.truncate(len);
        Ok(body)
    }

    /// Maps the protocol's shared error replies; anything else is unexpected.
    fn error_reply(&self, command: &'static str, line: String) -> Error {
        match line.as_str() {
            "OUT_OF_MEMORY" => Error::OutOfMemory,
            "INTERNAL_ERROR" => Error::InternalError,
            "BAD_FORMAT" => Error::BadFormat,
            "UNKNOWN_COMMAND" => Error::UnknownCommand,
            "EXPECTED_CRLF" => Error::ExpectedCrlf,
            "JOB_TOO_BIG" => Error::JobTooBig,
            "DRAINING" => Error::Draining,
            "NOT_FOUND" => Error::NotFound,
            "DEADLINE_SOON" => Error::DeadlineSoon,
            "NOT_IGNORED" => Error::NotIgnored,
            _ => Error::UnexpectedReply { command, reply: line },
        }
    }
}

fn optional(result: Result<Job>) -> Result<Option<Job>> {
    match result {
        Ok(job) => Ok(Some(job)),
        Err(Error::NotFound) => Ok(None),
        Err(e) => Err(e),
    }
}

fn parse_id(command: &'static str, word: &str, line: &str) -> Result<u64> {
    word.parse().map_err(|_| Error::UnexpectedReply { command, reply: line.to_string() })
}

fn parse_len(command: &'static str, word: &str, line: &str) -> Result<usize> {
    word.parse().map_err(|_| Error::UnexpectedReply { command, reply: line.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tube_names_follow_the_protocol_alphabet() {
        assert!(is_valid_tube_name("host.web-01"));
        assert!(is_valid_tube_name("a+b/c;d.$_()"));
        assert!(!is_valid_tube_name(""));
        assert!(!is_valid_tube_name("-leading"));
        assert!(!is_valid_tube_name("with space"));
        assert!(!is_valid_tube_name("inject\r\nput"));
        assert!(!is_valid_tube_name(&"x".repeat(201)));
        assert!(is_valid_tube_name(&"x".repeat(200)));
    }

    #[test]
    fn stats_yaml_is_parsed_flat() {
        let stats = Stats::parse("---\nid: 7\ntube: host.a\nstate: reserved\nversion: \"1.12\"\n");
        assert_eq!(stats.get_u64("id"), Some(7));
        assert_eq!(stats.get("state"), Some("reserved"));
        assert_eq!(stats.get("version"), Some("1.12"));
        assert_eq!(stats.get("missing"), None);
    }
}
