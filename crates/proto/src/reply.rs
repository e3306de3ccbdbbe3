//! Replies: every reply the server sends that has no variable part, in one
//! place, and [`ReplyLine`] for the lines that carry a number or a name.

/// Generic error: the server could not allocate memory for the request.
pub const OUT_OF_MEMORY: &[u8] = b"OUT_OF_MEMORY\r\n";
/// Generic error: a bug or an I/O failure inside the server.
pub const INTERNAL_ERROR: &[u8] = b"INTERNAL_ERROR\r\n";
/// Generic error: the client sent a malformed command line.
pub const BAD_FORMAT: &[u8] = b"BAD_FORMAT\r\n";
/// Generic error: the command word is not known.
pub const UNKNOWN_COMMAND: &[u8] = b"UNKNOWN_COMMAND\r\n";
/// `put`: the body was not followed by `\r\n`.
pub const EXPECTED_CRLF: &[u8] = b"EXPECTED_CRLF\r\n";
/// `put`: the announced body is larger than the maximum job size.
pub const JOB_TOO_BIG: &[u8] = b"JOB_TOO_BIG\r\n";
/// `put`: the server is in drain mode and accepts no new jobs.
pub const DRAINING: &[u8] = b"DRAINING\r\n";
/// The job or tube does not exist (or is not in a state the command accepts).
pub const NOT_FOUND: &[u8] = b"NOT_FOUND\r\n";
/// `delete` succeeded.
pub const DELETED: &[u8] = b"DELETED\r\n";
/// `release` succeeded.
pub const RELEASED: &[u8] = b"RELEASED\r\n";
/// `bury` succeeded (or `release` had to bury the job).
pub const BURIED: &[u8] = b"BURIED\r\n";
/// `touch` succeeded.
pub const TOUCHED: &[u8] = b"TOUCHED\r\n";
/// `kick-job` succeeded.
pub const KICKED: &[u8] = b"KICKED\r\n";
/// `ignore` of the last watched tube.
pub const NOT_IGNORED: &[u8] = b"NOT_IGNORED\r\n";
/// `pause-tube` succeeded.
pub const PAUSED: &[u8] = b"PAUSED\r\n";
/// `reserve`: a reserved job of this connection is inside its last second.
pub const DEADLINE_SOON: &[u8] = b"DEADLINE_SOON\r\n";
/// `reserve-with-timeout`: no job arrived in time.
pub const TIMED_OUT: &[u8] = b"TIMED_OUT\r\n";
/// Extension `revoke`: the job was cancelled.
pub const REVOKED: &[u8] = b"REVOKED\r\n";
/// Extension `revoke`: the job is reserved by a worker and cannot be revoked.
pub const NOT_REVOKED: &[u8] = b"NOT_REVOKED\r\n";
/// Extension `tube-ttl`: the tube's default TTL was set.
pub const TTL_SET: &[u8] = b"TTL_SET\r\n";

/// Prefix of `INSERTED <id>\r\n`.
pub const INSERTED_PREFIX: &[u8] = b"INSERTED ";
/// Prefix of `BURIED <id>\r\n` (a `put` that had to be buried).
pub const BURIED_PREFIX: &[u8] = b"BURIED ";
/// Prefix of `RESERVED <id> <bytes>\r\n`.
pub const RESERVED_PREFIX: &[u8] = b"RESERVED ";
/// Prefix of `FOUND <id> <bytes>\r\n`.
pub const FOUND_PREFIX: &[u8] = b"FOUND ";
/// Prefix of `KICKED <count>\r\n`.
pub const KICKED_PREFIX: &[u8] = b"KICKED ";
/// Prefix of `WATCHING <count>\r\n`.
pub const WATCHING_PREFIX: &[u8] = b"WATCHING ";
/// Prefix of `USING <tube>\r\n`.
pub const USING_PREFIX: &[u8] = b"USING ";
/// Prefix of `OK <bytes>\r\n` before a YAML body.
pub const OK_PREFIX: &[u8] = b"OK ";
/// Prefix of the extension reply `STATE <name>\r\n`.
pub const STATE_PREFIX: &[u8] = b"STATE ";
/// Line terminator.
pub const CRLF: &[u8] = b"\r\n";

/// A protocol line (a reply, or a client's command) assembled on the stack, so
/// answering a command allocates nothing.
///
/// The longest line the server sends is `USING <200-byte name>\r\n`; the buffer
/// is larger than that, and pushing past its end truncates rather than panics.
pub struct ReplyLine {
    buf: [u8; 256],
    len: usize,
}

impl Default for ReplyLine {
    fn default() -> Self {
        ReplyLine { buf: [0; 256], len: 0 }
    }
}

impl ReplyLine {
    /// An empty line.
    pub fn new() -> ReplyLine {
        ReplyLine::default()
    }

    /// `<prefix><n>\r\n`, e.g. `INSERTED 5\r\n`.
    pub fn number(prefix: &[u8], n: u64) -> ReplyLine {
        let mut line = ReplyLine::new();
        line.push(prefix).push_decimal(n).push(CRLF);
        line
    }

    /// `<prefix><id> <len>\r\n`, e.g. `RESERVED 5 12\r\n`.
    pub fn job_header(prefix: &[u8], id: u64, len: usize) -> ReplyLine {
        let mut line = ReplyLine::new();
        line.push(prefix).push_decimal(id).push(b" ").push_decimal(len as u64).push(CRLF);
        line
    }

    /// `<prefix><text>\r\n`, e.g. `USING default\r\n`.
    pub fn text(prefix: &[u8], text: &str) -> ReplyLine {
        let mut line = ReplyLine::new();
        line.push(prefix).push(text.as_bytes()).push(CRLF);
        line
    }

    /// Appends bytes.
    pub fn push(&mut self, bytes: &[u8]) -> &mut ReplyLine {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
        self
    }

    /// Appends the decimal representation of `n`.
    pub fn push_decimal(&mut self, mut n: u64) -> &mut ReplyLine {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push(&digits[i..])
    }

    /// The line so far.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}
