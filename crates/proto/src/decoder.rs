//! Framing: the two-phase [`Decoder`] (is a complete line or body buffered? only
//! then parse it), its [`Limits`], and the [`Decoded`] events it yields.

use crate::command::{parse_line, Command, Counted, Line, PutOptions};
use crate::reply;
use bytes::{Buf, BytesMut};

/// Longest command line beanstalkd 1.12 accepts, `\r\n` included.
pub const DEFAULT_MAX_LINE: usize = 224;
/// Default maximum job body size (`-z`).
pub const DEFAULT_MAX_JOB_SIZE: u32 = 65_535;
/// Largest `-z` beanstalkd accepts.
pub const MAX_JOB_SIZE_LIMIT: u32 = 1_073_741_824;

/// Finds the end of a command line as beanstalkd's `scan_line_end` does: the line
/// ends at the first `\r` only if a `\n` follows it. A `\r` followed by anything
/// else means "no line yet" (so such a line can only end by growing too long).
/// Returns the length including `\r\n`.
pub fn scan_line_end(buf: &[u8]) -> Option<usize> {
    if buf.len() < 2 {
        return None;
    }
    let cr = memchr::memchr(b'\r', &buf[..buf.len() - 1])?;
    (buf[cr + 1] == b'\n').then_some(cr + 2)
}

/// One decoded event of a connection's input stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// A complete command (for `put`, with its body).
    Command(Command),
    /// A valid `put` header; its body follows. beanstalkd counts the put, marks
    /// the connection a producer and assigns the job id at this point, before
    /// the body arrives (and whether or not it arrives intact).
    PutHeader,
    /// The input was invalid: send this reply and go on reading.
    Error(&'static [u8]),
    /// As `Error`, but beanstalkd counts the command in `stats` all the same.
    CountedError(Counted, &'static [u8]),
}

/// Limits the decoder enforces.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Longest command line, `\r\n` included.
    pub max_line: usize,
    /// Largest job body.
    pub max_job_size: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_line: DEFAULT_MAX_LINE, max_job_size: DEFAULT_MAX_JOB_SIZE }
    }
}

#[derive(Debug)]
enum State {
    /// Waiting for a command line.
    Line,
    /// A `put` header was read; waiting for `len + 2` body bytes.
    Body { pri: u32, delay: u32, ttr: u32, len: u32, opts: PutOptions },
    /// Discarding the rest of an over-long line, one line-buffer-sized window at a time.
    DiscardLine,
    /// Discarding an oversized body, then answering `JOB_TOO_BIG` (a counted put).
    SkipBody { remaining: u64 },
}

/// The framing state machine of one connection.
///
/// Feed it the connection's read buffer; it consumes complete frames and leaves
/// partial ones in place. Any split of the same byte stream decodes the same.
///
/// ```
/// use bytes::BytesMut;
/// use polaris_proto::{Command, Decoded, Decoder, Limits};
/// let mut decoder = Decoder::new(Limits::default());
/// let mut input = BytesMut::from(&b"put 0 0 60 5\r\nhel"[..]);
/// assert_eq!(decoder.decode(&mut input), Some(Decoded::PutHeader));
/// assert_eq!(decoder.decode(&mut input), None); // the body is not complete yet
/// input.extend_from_slice(b"lo\r\nreserve\r\n");
/// assert!(matches!(decoder.decode(&mut input), Some(Decoded::Command(Command::Put { .. }))));
/// assert_eq!(decoder.decode(&mut input), Some(Decoded::Command(Command::Reserve)));
/// ```
#[derive(Debug)]
pub struct Decoder {
    limits: Limits,
    state: State,
}

impl Decoder {
    /// A decoder in its initial state.
    pub fn new(limits: Limits) -> Decoder {
        Decoder { limits, state: State::Line }
    }

    /// How many more bytes the decoder needs before it can make progress, if it
    /// knows (inside a body). The server uses this to size reads.
    pub fn body_bytes_wanted(&self) -> Option<usize> {
        match self.state {
            State::Body { len, .. } => Some(len as usize + 2),
            _ => None,
        }
    }

    /// Decodes the next event from `buf`, consuming its bytes, or returns `None`
    /// when more input is needed.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Option<Decoded> {
        loop {
            match self.state {
                State::Line => {
                    let window = &buf[..buf.len().min(self.limits.max_line)];
                    match scan_line_end(window) {
                        Some(n) => {
                            let parsed = parse_line(&buf[..n - 2], self.limits.max_job_size);
                            buf.advance(n);
                            match parsed {
                                Line::Command(cmd) => return Some(Decoded::Command(cmd)),
                                Line::Error(e) => return Some(Decoded::Error(e)),
                                Line::CountedError(what, e) => return Some(Decoded::CountedError(what, e)),
                                Line::Put { pri, delay, ttr, len, opts } => {
                                    self.state = State::Body { pri, delay, ttr, len, opts };
                                    return Some(Decoded::PutHeader);
                                }
                                Line::TooBig { len } => {
                                    self.state = State::SkipBody { remaining: u64::from(len) + 2 };
                                }
                            }
                        }
                        None if buf.len() >= self.limits.max_line => {
                            // Too long: beanstalkd drops the whole line buffer and
                            // discards until the end of the line, then answers once.
                            buf.advance(self.limits.max_line);
                            self.state = State::DiscardLine;
                        }
                        None => return None,
                    }
                }
                State::DiscardLine => {
                    let window = &buf[..buf.len().min(self.limits.max_line)];
                    match scan_line_end(window) {
                        Some(n) => {
                            buf.advance(n);
                            self.state = State::Line;
                            return Some(Decoded::Error(reply::BAD_FORMAT));
                        }
                        None if buf.len() >= self.limits.max_line => buf.advance(self.limits.max_line),
                        None => return None,
                    }
                }
                State::Body { pri, delay, ttr, len, opts } => {
                    let total = len as usize + 2;
                    if buf.len() < total {
                        return None;
                    }
                    self.state = State::Line;
                    if &buf[len as usize..total] != b"\r\n" {
                        buf.advance(total);
                        return Some(Decoded::Error(reply::EXPECTED_CRLF));
                    }
                    // The body gets an allocation of its own, sized exactly.
                    let body: Box<[u8]> = buf[..len as usize].into();
                    buf.advance(total);
                    return Some(Decoded::Command(Command::Put { pri, delay, ttr, body, opts }));
                }
                State::SkipBody { remaining } => {
                    let take = remaining.min(buf.len() as u64);
                    buf.advance(take as usize);
                    let remaining = remaining - take;
                    if remaining > 0 {
                        self.state = State::SkipBody { remaining };
                        return None;
                    }
                    self.state = State::Line;
                    return Some(Decoded::CountedError(Counted::Put, reply::JOB_TOO_BIG));
                }
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn decode_all(input: &[u8], chunks: &[usize]) -> Vec<Decoded> {
        let mut dec = Decoder::new(Limits::default());
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut pos = 0;
        for &n in chunks.iter().chain(std::iter::repeat(&7)) {
            if pos >= input.len() {
                break;
            }
            let end = (pos + n.max(1)).min(input.len());
            buf.extend_from_slice(&input[pos..end]);
            pos = end;
            while let Some(d) = dec.decode(&mut buf) {
                out.push(d);
            }
        }
        out
    }

    pub(crate) fn one(line: &str) -> Decoded {
        let mut v = decode_all(line.as_bytes(), &[line.len()]);
        v.retain(|d| *d != Decoded::PutHeader);
        assert_eq!(v.len(), 1, "{line:?} gave {v:?}");
        v.remove(0)
    }

    pub(crate) fn cmd(line: &str) -> Command {
        match one(line) {
            Decoded::Command(c) => c,
            other => panic!("{line:?} gave {other:?}"),
        }
    }

    pub(crate) fn err(line: &str) -> &'static [u8] {
        match one(line) {
            Decoded::Error(e) | Decoded::CountedError(_, e) => e,
            other => panic!("{line:?} gave {other:?}"),
        }
    }

    #[test]
    fn framing_quirks() {
        // A bare \n does not end a line; the line goes on until \r\n.
        assert_eq!(err("stats\nx\r\n"), reply::BAD_FORMAT);
        // Over-long lines are answered once, after their end.
        let long = format!("{}\r\nstats\r\n", "x".repeat(500));
        let got = decode_all(long.as_bytes(), &[long.len()]);
        assert_eq!(got, vec![Decoded::Error(reply::BAD_FORMAT), Decoded::Command(Command::Stats)]);
        // A 224-byte line (with CRLF) is still a line.
        let max = format!("use {}\r\n", "a".repeat(218));
        assert_eq!(err(&max), reply::BAD_FORMAT); // 218 > 200: a name error, not a length error
                                                  // Body longer than announced.
        let got = decode_all(b"put 0 0 1 1\r\nabc\r\n", &[100]);
        assert_eq!(
            got,
            vec![Decoded::PutHeader, Decoded::Error(reply::EXPECTED_CRLF), Decoded::Error(reply::UNKNOWN_COMMAND)]
        );
        // Oversized body is skipped, then JOB_TOO_BIG.
        let input = format!("put 0 0 1 70000\r\n{}\r\nstats\r\n", "z".repeat(70000));
        let got = decode_all(input.as_bytes(), &[1000]);
        assert_eq!(
            got,
            vec![Decoded::CountedError(Counted::Put, reply::JOB_TOO_BIG), Decoded::Command(Command::Stats)]
        );
        // A bad put line: its body is read as a command.
        let got = decode_all(b"put 0 0 1 1 x\r\nstats\r\n", &[100]);
        assert_eq!(got, vec![Decoded::CountedError(Counted::Put, reply::BAD_FORMAT), Decoded::Command(Command::Stats)]);
    }

    proptest! {
        #[test]
        fn any_split_decodes_the_same(
            pieces in proptest::collection::vec(
                prop_oneof![
                    Just("put 1 0 5 3\r\nabc\r\n".to_string()),
                    Just("reserve\r\n".to_string()),
                    Just("delete 12\r\n".to_string()),
                    Just("put 0 0 1 2\r\nxyz\r\n".to_string()),
                    Just("bogus\r\n".to_string()),
                    Just(format!("{}\r\n", "q".repeat(300))),
                    Just("put 0 0 1 70000\r\n".to_string() + &"k".repeat(70000) + "\r\n"),
                    "[a-z \r\n]{0,20}",
                ],
                1..12,
            ),
            chunks in proptest::collection::vec(1usize..400, 1..50),
        ) {
            let input: String = pieces.concat();
            let whole = decode_all(input.as_bytes(), &[input.len()]);
            let split = decode_all(input.as_bytes(), &chunks);
            prop_assert_eq!(whole, split);
        }

        #[test]
        fn never_panics_on_garbage(input in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = decode_all(&input, &[3, 50, 1]);
        }
    }
}
