//! Helpers shared by the integration tests: starting servers (polarisd and the
//! reference beanstalkd) and talking to them in raw bytes.
//!
//! Every integration test crate compiles this module separately and uses only
//! part of it, hence the `dead_code` allowance.
#![allow(dead_code)]

use anyhow::{anyhow, bail, Context, Result};
use std::collections::HashSet;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// Where Debian installs the reference server.
pub const BEANSTALKD_PATH: &str = "/usr/bin/beanstalkd";

/// How long a helper waits for a server to start or for an expected reply.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Reports a missing test prerequisite: a visible `SKIP:` line on a developer
/// machine, but a panic under CI (`CI` set), where every test must really run.
pub fn skip_unless_ci(missing: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("CI is set, so this test may not be skipped: {missing}");
    }
    // Written straight to stderr, not with eprintln!, so that the test
    // harness's output capture does not hide it when the test "passes".
    let _ = writeln!(std::io::stderr(), "SKIP: {missing}");
}

/// Returns the reference beanstalkd binary, or `None` (after printing a visible
/// SKIP line) when it is not installed. Under CI a missing binary is a failure.
pub fn require_beanstalkd() -> Option<PathBuf> {
    let path = Path::new(BEANSTALKD_PATH);
    if path.is_file() {
        return Some(path.to_path_buf());
    }
    skip_unless_ci(&format!(
        "{BEANSTALKD_PATH} not found; install it with `apt-get install beanstalkd`"
    ));
    None
}

/// A server child process that is killed (and reaped) when dropped.
pub struct ServerProcess {
    child: Child,
    addr: SocketAddr,
    /// Short label for messages, e.g. "polarisd" or "beanstalkd".
    label: String,
    /// Everything the process printed (stderr, and stdout after the banner).
    output: Arc<Mutex<Vec<u8>>>,
}

impl ServerProcess {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    /// Opens a raw connection to the server.
    pub fn connect(&self) -> Result<RawConn> {
        RawConn::connect(self.addr)
            .with_context(|| format!("connecting to {} at {}", self.label, self.addr))
    }

    /// Sends a signal by name (e.g. "USR1") to the server process.
    pub fn signal(&self, name: &str) -> Result<()> {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .context("running kill")?;
        if !status.success() {
            bail!("kill -{name} {} failed: {status}", self.pid());
        }
        Ok(())
    }

    /// What the process has printed so far, lossily decoded, for failure messages.
    pub fn output(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().unwrap()).into_owned()
    }

    /// The last `max` bytes the process printed, lossily decoded.
    pub fn output_tail(&self, max: usize) -> String {
        let output = self.output.lock().unwrap();
        String::from_utf8_lossy(&output[output.len().saturating_sub(max)..]).into_owned()
    }

    /// Returns the exit status if the process has already exited.
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Copies everything from `source` into `sink` on a background thread, so a
/// chatty server never blocks on a full pipe.
fn drain_into(mut source: impl Read + Send + 'static, sink: Arc<Mutex<Vec<u8>>>) {
    thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = source.read(&mut chunk) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
}

/// Starts polarisd on a free loopback port (`-l 127.0.0.1 -p 0`, then
/// `extra_args`) and waits for its `listening on HOST:PORT` banner.
pub fn spawn_polarisd(extra_args: &[&str]) -> Result<ServerProcess> {
    spawn_announcing(Path::new(env!("CARGO_BIN_EXE_polarisd")), extra_args)
}

/// Spawns `binary` with `listen_args` then `extra_args`, stdin closed and both
/// outputs piped (the caller drains them).
fn spawn_piped(binary: &Path, listen_args: &[&str], extra_args: &[&str]) -> Result<Child> {
    Command::new(binary)
        .args(listen_args)
        .args(extra_args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {}", binary.display()))
}

/// Starts a server that supports `-p 0` and announces its address as the first
/// line of stdout (`listening on HOST:PORT`), as polarisd does.
pub fn spawn_announcing(binary: &Path, extra_args: &[&str]) -> Result<ServerProcess> {
    let mut child = spawn_piped(binary, &["-l", "127.0.0.1", "-p", "0"], extra_args)?;
    let output = Arc::new(Mutex::new(Vec::new()));
    drain_into(child.stderr.take().unwrap(), output.clone());
    let banner = read_banner(child.stdout.take().unwrap(), output.clone());
    let label = binary
        .file_name()
        .map_or("server".into(), |n| n.to_string_lossy().into_owned());
    let mut server = ServerProcess {
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        label,
        output,
    };

    let line = match banner.recv_timeout(IO_TIMEOUT) {
        Ok(line) => line,
        Err(_) => bail!(
            "{} printed no `listening on` line within {:?}; output so far:\n{}",
            binary.display(),
            IO_TIMEOUT,
            server.output()
        ),
    };
    let Some(addr_text) = line.trim_end().strip_prefix("listening on ") else {
        // Give a crashing process a moment to exit, so the message says how it ended.
        thread::sleep(Duration::from_millis(100));
        let status = server
            .try_exit_status()
            .map_or("still running".to_string(), |s| s.to_string());
        let first_line = if line.is_empty() {
            "it closed stdout without printing anything".to_string()
        } else {
            format!("its first stdout line was {line:?}")
        };
        bail!(
            "{} did not start: {first_line}, expected `listening on HOST:PORT`; \
             process status: {status}; output: {:?}",
            binary.display(),
            server.output()
        );
    };
    server.addr = addr_text
        .parse()
        .with_context(|| format!("parsing the address in banner {line:?}"))?;
    Ok(server)
}

/// Reads the first stdout line on a thread (so the caller can time out), then
/// keeps draining stdout into `output`. Sends "" if stdout closes first.
fn read_banner(stdout: ChildStdout, output: Arc<Mutex<Vec<u8>>>) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        let _ = reader.read_line(&mut line);
        let _ = tx.send(line);
        let mut rest = Vec::new();
        let _ = reader.read_to_end(&mut rest);
        output.lock().unwrap().extend_from_slice(&rest);
    });
    rx
}

/// Starts beanstalkd (or a compatible binary) on a free loopback port with
/// `extra_args`. beanstalkd cannot bind port 0, so a free port is picked by
/// binding and releasing it; if another process grabs it in between, the
/// start is retried on a new port.
///
/// Readiness is detected by finding the child's listening socket in
/// /proc instead of connecting to it: a probe connection would bump
/// `total-connections` and make the server differ from polarisd.
pub fn spawn_beanstalkd(binary: &Path, extra_args: &[&str]) -> Result<ServerProcess> {
    let mut last_error = anyhow!("no attempt made");
    for _attempt in 0..5 {
        let port = free_port()?;
        let mut child = spawn_piped(binary, &["-l", "127.0.0.1", "-p", &port.to_string()], extra_args)?;
        let output = Arc::new(Mutex::new(Vec::new()));
        drain_into(child.stdout.take().unwrap(), output.clone());
        drain_into(child.stderr.take().unwrap(), output.clone());
        let label = binary
            .file_name()
            .map_or("server".into(), |n| n.to_string_lossy().into_owned());
        let mut server = ServerProcess {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            label,
            output,
        };

        let deadline = Instant::now() + IO_TIMEOUT;
        loop {
            if let Some(status) = server.try_exit_status() {
                last_error = anyhow!(
                    "{} exited with {status} on port {port}; output:\n{}",
                    binary.display(),
                    server.output()
                );
                break;
            }
            if process_listens_on(server.pid(), port) {
                return Ok(server);
            }
            if Instant::now() > deadline {
                last_error = anyhow!(
                    "{} did not listen on port {port} within {IO_TIMEOUT:?}",
                    binary.display()
                );
                break;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }
    Err(last_error)
}

/// Picks a loopback port that is free right now and that this test process has
/// not handed out before (so parallel spawns never get the same one).
pub fn free_port() -> Result<u16> {
    static HANDED_OUT: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let handed_out = HANDED_OUT.get_or_init(Default::default);
    for _ in 0..100 {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        if handed_out.lock().unwrap().insert(port) {
            return Ok(port);
        }
    }
    bail!("could not find a fresh free port")
}

/// True if process `pid` owns a TCP socket listening on `port` (IPv4 or IPv6).
fn process_listens_on(pid: u32, port: u16) -> bool {
    let mut listening_inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // fields: sl, local_address (HEXIP:HEXPORT), rem_address, st, ..., inode at 9
            let (Some(local), Some(state), Some(inode)) =
                (fields.get(1), fields.get(3), fields.get(9))
            else {
                continue;
            };
            let local_port = local
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port) && *state == "0A" {
                listening_inodes.push(format!("socket:[{inode}]"));
            }
        }
    }
    if listening_inodes.is_empty() {
        return false;
    }
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .map(|target| {
                listening_inodes
                    .iter()
                    .any(|s| target.as_os_str() == s.as_str())
            })
            .unwrap_or(false)
    })
}

/// One reply frame from the server: a line, plus a body for the data-carrying
/// replies `RESERVED <id> <n>`, `FOUND <id> <n>` and `OK <n>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The reply line without its CRLF.
    pub line: Vec<u8>,
    /// The `<n>` body bytes, without the trailing CRLF, for data replies.
    pub body: Option<Vec<u8>>,
    /// Every byte of the frame exactly as received.
    pub raw: Vec<u8>,
}

impl Reply {
    /// The line as text (lossy), e.g. "INSERTED 1".
    pub fn line_str(&self) -> String {
        String::from_utf8_lossy(&self.line).into_owned()
    }

    /// The two bytes that followed a data body; a correct server sends CRLF.
    pub fn body_trailer(&self) -> Option<&[u8]> {
        self.body.as_ref().map(|_| &self.raw[self.raw.len() - 2..])
    }
}

/// Body length announced by a data reply line, or `None` for plain replies.
fn announced_body_len(line: &[u8]) -> Option<usize> {
    let text = std::str::from_utf8(line).ok()?;
    let words: Vec<&str> = text.split(' ').collect();
    let expected_words = match words[0] {
        "RESERVED" | "FOUND" => 3,
        "OK" => 2,
        _ => return None,
    };
    if words.len() != expected_words {
        return None;
    }
    words.last()?.parse().ok()
}

/// Parses one reply frame from the start of `buf`. Returns the reply and the
/// number of bytes it used, or `None` if `buf` does not hold a whole frame yet.
pub fn parse_reply(buf: &[u8]) -> Option<(Reply, usize)> {
    let line_end = buf.windows(2).position(|w| w == b"\r\n")?;
    let line = buf[..line_end].to_vec();
    let mut used = line_end + 2;
    let body = match announced_body_len(&line) {
        Some(n) => {
            if buf.len() < used + n + 2 {
                return None;
            }
            let body = buf[used..used + n].to_vec();
            used += n + 2;
            Some(body)
        }
        None => None,
    };
    Some((
        Reply {
            line,
            body,
            raw: buf[..used].to_vec(),
        },
        used,
    ))
}

/// What a timed read produced.
pub enum ReadOutcome {
    /// Some bytes were appended to the buffer.
    Data,
    /// Nothing arrived before the timeout.
    Quiet,
    /// The server closed the connection (EOF or reset).
    Closed,
}

/// A raw TCP connection to a beanstalk server with a receive buffer.
pub struct RawConn {
    stream: TcpStream,
    /// Bytes received but not consumed yet.
    buf: Vec<u8>,
    /// Set once the server closed its end.
    closed: bool,
}

impl RawConn {
    pub fn connect(addr: SocketAddr) -> Result<RawConn> {
        let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
        // Each send() must leave as its own segment, so that "split" writes
        // really arrive in pieces.
        stream.set_nodelay(true)?;
        Ok(RawConn {
            stream,
            buf: Vec::new(),
            closed: false,
        })
    }

    /// Writes all of `bytes` (one `write_all`).
    pub fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream.write_all(bytes).context("sending to server")?;
        Ok(())
    }

    /// True once the server has closed the connection.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Bytes received but not yet consumed.
    pub fn buffered(&self) -> &[u8] {
        &self.buf
    }

    /// Removes and returns everything buffered.
    pub fn take_buffered(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }

    /// Removes and returns the first reply if the buffer holds a whole one.
    pub fn take_reply(&mut self) -> Option<Reply> {
        let (reply, used) = parse_reply(&self.buf)?;
        self.buf.drain(..used);
        Some(reply)
    }

    /// Half-closes the connection: the server sees end of input, but can
    /// still send.
    pub fn shutdown_write(&self) -> Result<()> {
        self.stream
            .shutdown(Shutdown::Write)
            .context("shutting down the write half")
    }

    /// Closes both directions of the client socket.
    pub fn close(self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    /// Waits up to `timeout` for more bytes and appends them to the buffer.
    pub fn read_some(&mut self, timeout: Duration) -> Result<ReadOutcome> {
        if self.closed {
            return Ok(ReadOutcome::Closed);
        }
        self.stream
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
        let mut chunk = [0u8; 65536];
        match self.stream.read(&mut chunk) {
            Ok(0) => {
                self.closed = true;
                Ok(ReadOutcome::Closed)
            }
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(ReadOutcome::Data)
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                Ok(ReadOutcome::Quiet)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
                ) =>
            {
                // A close with unread input becomes a reset; for the client
                // it means the same thing as EOF.
                self.closed = true;
                Ok(ReadOutcome::Closed)
            }
            Err(e) => Err(e).context("reading from server"),
        }
    }

    /// Reads until nothing has arrived for `quiet`, and returns every byte
    /// received (including what was buffered before).
    pub fn read_until_quiet(&mut self, quiet: Duration) -> Result<Vec<u8>> {
        while let ReadOutcome::Data = self.read_some(quiet)? {}
        Ok(self.take_buffered())
    }

    /// Reads exactly `want.len()` bytes (waiting up to [`IO_TIMEOUT`]) and fails
    /// with a readable side-by-side if they differ from `want`.
    pub fn expect(&mut self, want: &[u8]) -> Result<()> {
        let deadline = Instant::now() + IO_TIMEOUT;
        while self.buf.len() < want.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            if let ReadOutcome::Closed = self.read_some(left)? {
                break;
            }
        }
        let got: Vec<u8> = self.buf.drain(..want.len().min(self.buf.len())).collect();
        if got == want {
            return Ok(());
        }
        let first_diff = got
            .iter()
            .zip(want)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(want.len()));
        let why = if got.len() < want.len() {
            if self.closed {
                "connection closed early"
            } else {
                "timed out"
            }
        } else {
            "bytes differ"
        };
        bail!(
            "unexpected reply ({why}, first difference at byte {first_diff}):\n  expected: {}\n       got: {}",
            escape_bytes(want),
            escape_bytes(&got)
        )
    }

    /// Reads one reply frame, waiting up to [`IO_TIMEOUT`].
    pub fn read_reply(&mut self) -> Result<Reply> {
        self.read_reply_within(IO_TIMEOUT)?.ok_or_else(|| {
            anyhow!(
                "no complete reply within {IO_TIMEOUT:?}; got so far: {}",
                escape_bytes(&self.buf)
            )
        })
    }

    /// Reads one reply frame if one completes within `timeout`; `Ok(None)` if
    /// not (the partial bytes stay buffered) or if the server closed first.
    pub fn read_reply_within(&mut self, timeout: Duration) -> Result<Option<Reply>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(reply) = self.take_reply() {
                return Ok(Some(reply));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            if let ReadOutcome::Closed = self.read_some(left)? {
                return Ok(self.take_reply());
            }
        }
    }

    /// Sends `command` and reads its reply: the common request/response step.
    pub fn roundtrip(&mut self, command: &[u8]) -> Result<Reply> {
        self.send(command)?;
        self.read_reply()
    }

    /// Sends a command given as text and returns its reply line as text.
    pub fn line(&mut self, command: &str) -> Result<String> {
        Ok(self.roundtrip(command.as_bytes())?.line_str())
    }
}

/// Renders bytes readably: printable ASCII as is, `\r \n \t \0 \\` and `\xNN`
/// escapes otherwise, and runs of 16 or more equal bytes as `\{N*b}` (the
/// scenario files' repeat syntax), so a 64 KiB body stays one short line.
pub fn escape_bytes(bytes: &[u8]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < bytes.len() {
        let run = bytes[i..].iter().take_while(|&&b| b == bytes[i]).count();
        if run >= 16 {
            let _ = write!(out, "\\{{{run}*{}}}", escape_byte(bytes[i]));
            i += run;
        } else {
            out.push_str(&escape_byte(bytes[i]));
            i += 1;
        }
    }
    out
}

fn escape_byte(b: u8) -> String {
    match b {
        b'\r' => "\\r".into(),
        b'\n' => "\\n".into(),
        b'\t' => "\\t".into(),
        b'\0' => "\\0".into(),
        b'\\' => "\\\\".into(),
        b'{' | b'}' => format!("\\x{b:02x}"),
        0x20..=0x7e => (b as char).to_string(),
        _ => format!("\\x{b:02x}"),
    }
}
