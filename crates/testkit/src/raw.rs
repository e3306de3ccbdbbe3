//! Raw protocol connections: bytes out, reply frames in, exactly as the server sent them.

use crate::IO_TIMEOUT;
use anyhow::{anyhow, bail, Context, Result};
use std::fmt::Write as _;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

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
    Some((Reply { line, body, raw: buf[..used].to_vec() }, used))
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
        Ok(RawConn { stream, buf: Vec::new(), closed: false })
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
        self.stream.shutdown(Shutdown::Write).context("shutting down the write half")
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
        self.stream.set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
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
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Ok(ReadOutcome::Quiet),
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted) => {
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
        let first_diff = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(got.len().min(want.len()));
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
        self.read_reply_within(IO_TIMEOUT)?
            .ok_or_else(|| anyhow!("no complete reply within {IO_TIMEOUT:?}; got so far: {}", escape_bytes(&self.buf)))
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
