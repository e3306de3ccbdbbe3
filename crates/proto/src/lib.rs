//! The beanstalk wire protocol: reply bytes, command parsing and framing.
//!
//! Everything here is a pure function of its input bytes, so it can be tested
//! (and fuzzed) without sockets. Framing is two-phase, as in beanstalkd: a
//! [`Decoder`] first checks whether a complete line (or body) is buffered, without
//! allocating, and only then parses it into a [`Command`].
//!
//! Parsing follows beanstalkd 1.12 to the byte, quirks included: commands match
//! by prefix in a fixed order, numbers may be preceded by runs of spaces, a line
//! ends at the first `\r` only if `\n` follows it, and so on. Where a quirk is
//! surprising, the comment says which client-visible behaviour it preserves.

use bytes::{Buf, BytesMut};

pub mod client;

/// Every reply the server sends that has no variable part, in one place.
pub mod reply {
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
}

/// Longest command line beanstalkd 1.12 accepts, `\r\n` included.
pub const DEFAULT_MAX_LINE: usize = 224;
/// Default maximum job body size (`-z`).
pub const DEFAULT_MAX_JOB_SIZE: u32 = 65_535;
/// Largest `-z` beanstalkd accepts.
pub const MAX_JOB_SIZE_LIMIT: u32 = 1_073_741_824;
/// Longest tube name.
pub const MAX_TUBE_NAME: usize = 200;

/// A validated tube name: 1–200 bytes of `A-Za-z0-9-+/;.$_()`, not starting with `-`.
/// Shared, so that cloning one (every job record names its tube) costs no allocation.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TubeName(std::sync::Arc<str>);

impl TubeName {
    /// Validates `raw` as beanstalkd's `name_is_ok` does.
    ///
    /// ```
    /// use polaris_proto::TubeName;
    /// assert!(TubeName::parse(b"host.web-01").is_some());
    /// assert!(TubeName::parse(b"-leading-dash").is_none());
    /// assert!(TubeName::parse(&[b'a'; 201]).is_none());
    /// ```
    pub fn parse(raw: &[u8]) -> Option<TubeName> {
        // All name characters are ASCII, so the conversion is lossless once the check holds.
        is_valid_tube_name(raw).then(|| TubeName(String::from_utf8_lossy(raw).into()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for TubeName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether `raw` is a tube name the protocol accepts (beanstalkd's `name_is_ok`): 1–200
/// bytes of `A-Z a-z 0-9 - + / ; . $ _ ( )`, not starting with `-`. The one copy of the
/// rule: the decoder, the client and the ops channel's host ids all ask it.
pub fn is_valid_tube_name(raw: &[u8]) -> bool {
    !raw.is_empty() && raw.len() <= MAX_TUBE_NAME && raw[0] != b'-' && raw.iter().all(|&b| is_name_char(b))
}

fn is_name_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-+/;.$_()".contains(&b)
}

/// Per-job options carried by the `put` extension (see `protocol.md`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PutOptions {
    /// Seconds a ready job may wait to be reserved before it expires; `None` uses the tube default.
    pub ttl: Option<u32>,
}

/// One parsed request. Numbers are in the units of the protocol (seconds).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// `put <pri> <delay> <ttr> <bytes>` followed by the body.
    Put {
        /// Priority, lower is more urgent.
        pri: u32,
        /// Seconds before the job becomes ready.
        delay: u32,
        /// Seconds a worker may hold the job.
        ttr: u32,
        /// The body, without its trailing `\r\n`.
        body: Box<[u8]>,
        /// Extension options (none for plain beanstalk `put`).
        opts: PutOptions,
    },
    /// `use <tube>`
    Use(TubeName),
    /// `reserve`
    Reserve,
    /// `reserve-with-timeout <seconds>`; `None` (a negative timeout) waits forever.
    ReserveWithTimeout(Option<u32>),
    /// `reserve-job <id>`
    ReserveJob(u64),
    /// `delete <id>`
    Delete(u64),
    /// `release <id> <pri> <delay>`
    Release {
        /// Job id.
        id: u64,
        /// New priority.
        pri: u32,
        /// Seconds before the job becomes ready again.
        delay: u32,
    },
    /// `bury <id> <pri>`
    Bury {
        /// Job id.
        id: u64,
        /// New priority.
        pri: u32,
    },
    /// `touch <id>`
    Touch(u64),
    /// `watch <tube>`
    Watch(TubeName),
    /// `ignore <tube>`
    Ignore(TubeName),
    /// `peek <id>`
    Peek(u64),
    /// `peek-ready`
    PeekReady,
    /// `peek-delayed`
    PeekDelayed,
    /// `peek-buried`
    PeekBuried,
    /// `kick <bound>`
    Kick(u32),
    /// `kick-job <id>`
    KickJob(u64),
    /// `stats-job <id>`
    StatsJob(u64),
    /// `stats-tube <tube>`
    StatsTube(TubeName),
    /// `stats`
    Stats,
    /// `list-tubes`
    ListTubes,
    /// `list-tube-used`
    ListTubeUsed,
    /// `list-tubes-watched`
    ListTubesWatched,
    /// `pause-tube <tube> <delay>`
    PauseTube {
        /// The tube.
        name: TubeName,
        /// Seconds to pause; 0 ends a pause.
        delay: u32,
    },
    /// `quit`
    Quit,
    /// Extension: `revoke <id>` cancels a job that is not reserved.
    Revoke(u64),
    /// Extension: `job-state <id>` answers the live or final state of a job.
    JobState(u64),
    /// Extension: `polaris-stats` answers the extension counters as YAML.
    PolarisStats,
    /// Extension: `tube-ttl <tube> <seconds>` sets a tube's default job TTL (0 = none).
    TubeTtl {
        /// The tube.
        name: TubeName,
        /// Default TTL in seconds; 0 removes it.
        ttl: u32,
    },
}

/// What a complete command line turned out to be.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    /// A command that needs no body.
    Command(Command),
    /// A `put` header; `len` body bytes and `\r\n` follow.
    Put { pri: u32, delay: u32, ttr: u32, len: u32, opts: PutOptions },
    /// A `put` whose announced size is over the limit: skip `len + 2` bytes, then answer.
    TooBig { len: u32 },
    /// Answer with this error.
    Error(&'static [u8]),
    /// Answer with this error, but count the command in `stats` (beanstalkd does).
    CountedError(Counted, &'static [u8]),
}

/// Commands that beanstalkd counts in `stats` even when it refuses them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counted {
    /// A `put` whose four numbers parsed (then too big, or trailing garbage).
    Put,
    /// Any line starting with `pause-tube`.
    PauseTube,
}

/// Skips leading spaces, then reads a decimal number as beanstalkd's `read_u64`
/// does: a digit must come first, overflow is an error. Returns the number and
/// the rest of the input after the digits.
fn read_number(input: &[u8], max: u64) -> Option<(u64, &[u8])> {
    let start = input.iter().position(|&b| b != b' ').unwrap_or(input.len());
    let input = &input[start..];
    let digits = input.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 {
        return None;
    }
    let mut value: u64 = 0;
    for &d in &input[..digits] {
        value = value.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
    }
    (value <= max).then_some((value, &input[digits..]))
}

fn read_u32(input: &[u8]) -> Option<(u32, &[u8])> {
    read_number(input, u64::from(u32::MAX)).map(|(v, rest)| (v as u32, rest))
}

/// A number that must be the whole rest of the line.
fn whole_u32(input: &[u8]) -> Option<u32> {
    read_u32(input).and_then(|(v, rest)| rest.is_empty().then_some(v))
}

fn whole_u64(input: &[u8]) -> Option<u64> {
    read_number(input, u64::MAX).and_then(|(v, rest)| rest.is_empty().then_some(v))
}

/// Parses one command line (without its `\r\n`).
fn parse_line(line: &[u8], max_job_size: u32) -> Line {
    use Command as C;
    // beanstalkd NUL-terminates the line and rejects one with an embedded NUL.
    if memchr::memchr(0, line).is_some() {
        return Line::Error(reply::BAD_FORMAT);
    }
    let bad = Line::Error(reply::BAD_FORMAT);
    let id_cmd = |rest: &[u8], make: fn(u64) -> Command| match whole_u64(rest) {
        Some(id) => Line::Command(make(id)),
        None => Line::Error(reply::BAD_FORMAT),
    };
    let tube_cmd = |rest: &[u8], make: fn(TubeName) -> Command| match TubeName::parse(rest) {
        Some(name) => Line::Command(make(name)),
        None => Line::Error(reply::BAD_FORMAT),
    };
    // Commands without arguments must match the whole line.
    let exact =
        |rest: &[u8], cmd: Command| if rest.is_empty() { Line::Command(cmd) } else { Line::Error(reply::BAD_FORMAT) };

    // The order matters: beanstalkd tests prefixes in exactly this order, so
    // `peek-ready` is not `peek <id>` and `reserve-job` is not `reserve`.
    if let Some(rest) = line.strip_prefix(b"put ") {
        return parse_put(rest, max_job_size);
    }
    if let Some(rest) = line.strip_prefix(b"peek ") {
        return id_cmd(rest, C::Peek);
    }
    if let Some(rest) = line.strip_prefix(b"peek-ready") {
        return exact(rest, C::PeekReady);
    }
    if let Some(rest) = line.strip_prefix(b"peek-delayed") {
        return exact(rest, C::PeekDelayed);
    }
    if let Some(rest) = line.strip_prefix(b"peek-buried") {
        return exact(rest, C::PeekBuried);
    }
    if let Some(rest) = line.strip_prefix(b"reserve-with-timeout ") {
        // beanstalkd reads this one with a bare `strtol` into an int: junk after
        // the number is ignored, no digits read as 0, the value is truncated to
        // 32 bits, and a negative timeout waits forever. Only overflow of the
        // long is an error.
        return match strtol(rest) {
            Some(v) => {
                let t = v as i32;
                Line::Command(C::ReserveWithTimeout((t >= 0).then_some(t as u32)))
            }
            None => bad,
        };
    }
    if let Some(rest) = line.strip_prefix(b"reserve-job ") {
        return id_cmd(rest, C::ReserveJob);
    }
    if let Some(rest) = line.strip_prefix(b"reserve") {
        return exact(rest, C::Reserve);
    }
    if let Some(rest) = line.strip_prefix(b"delete ") {
        return id_cmd(rest, C::Delete);
    }
    if let Some(rest) = line.strip_prefix(b"release ") {
        let parsed = read_number(rest, u64::MAX).and_then(|(id, rest)| {
            let (pri, rest) = read_u32(rest)?;
            Some((id, pri, whole_u32(rest)?))
        });
        return match parsed {
            Some((id, pri, delay)) => Line::Command(C::Release { id, pri, delay }),
            None => bad,
        };
    }
    if let Some(rest) = line.strip_prefix(b"bury ") {
        let parsed = read_number(rest, u64::MAX).and_then(|(id, rest)| Some((id, whole_u32(rest)?)));
        return match parsed {
            Some((id, pri)) => Line::Command(C::Bury { id, pri }),
            None => bad,
        };
    }
    if let Some(rest) = line.strip_prefix(b"kick ") {
        // beanstalkd reads the bound with a bare `strtoul`: junk after the
        // number is ignored, `-1` wraps around, and the value is truncated to
        // 32 bits. No digits, or overflow of 64 bits, is an error.
        return match strtoul(rest) {
            Some(n) => Line::Command(C::Kick(n as u32)),
            None => bad,
        };
    }
    if let Some(rest) = line.strip_prefix(b"kick-job ") {
        return id_cmd(rest, C::KickJob);
    }
    if let Some(rest) = line.strip_prefix(b"touch ") {
        return id_cmd(rest, C::Touch);
    }
    if let Some(rest) = line.strip_prefix(b"stats-job ") {
        return id_cmd(rest, C::StatsJob);
    }
    if let Some(rest) = line.strip_prefix(b"stats-tube ") {
        return tube_cmd(rest, C::StatsTube);
    }
    if let Some(rest) = line.strip_prefix(b"stats") {
        return exact(rest, C::Stats);
    }
    if let Some(rest) = line.strip_prefix(b"use ") {
        return tube_cmd(rest, C::Use);
    }
    if let Some(rest) = line.strip_prefix(b"watch ") {
        return tube_cmd(rest, C::Watch);
    }
    if let Some(rest) = line.strip_prefix(b"ignore ") {
        return tube_cmd(rest, C::Ignore);
    }
    if let Some(rest) = line.strip_prefix(b"list-tubes-watched") {
        return exact(rest, C::ListTubesWatched);
    }
    if let Some(rest) = line.strip_prefix(b"list-tube-used") {
        return exact(rest, C::ListTubeUsed);
    }
    if let Some(rest) = line.strip_prefix(b"list-tubes") {
        return exact(rest, C::ListTubes);
    }
    if line.starts_with(b"quit") {
        // beanstalkd closes on any line starting with `quit`.
        return Line::Command(C::Quit);
    }
    if let Some(rest) = line.strip_prefix(b"pause-tube") {
        return match parse_pause_tube(rest) {
            Some(cmd) => Line::Command(cmd),
            None => Line::CountedError(Counted::PauseTube, reply::BAD_FORMAT),
        };
    }
    // Extensions come last so they can never shadow a beanstalk command.
    if let Some(rest) = line.strip_prefix(b"revoke ") {
        return id_cmd(rest, C::Revoke);
    }
    if let Some(rest) = line.strip_prefix(b"job-state ") {
        return id_cmd(rest, C::JobState);
    }
    if let Some(rest) = line.strip_prefix(b"polaris-stats") {
        return exact(rest, C::PolarisStats);
    }
    if let Some(rest) = line.strip_prefix(b"tube-ttl ") {
        let name_len = rest.iter().position(|&b| b == b' ').unwrap_or(rest.len());
        let parsed = TubeName::parse(&rest[..name_len]).zip(whole_u32(&rest[name_len..]));
        return match parsed {
            Some((name, ttl)) => Line::Command(C::TubeTtl { name, ttl }),
            None => bad,
        };
    }
    Line::Error(reply::UNKNOWN_COMMAND)
}

/// `put <pri> <delay> <ttr> <bytes>[ ttl=<seconds>]`. The size check comes before
/// the trailing-garbage check, as in beanstalkd: an oversized put with junk after
/// the size still has its body skipped and answers `JOB_TOO_BIG`.
fn parse_put(rest: &[u8], max_job_size: u32) -> Line {
    let header = read_u32(rest).and_then(|(pri, rest)| {
        let (delay, rest) = read_u32(rest)?;
        let (ttr, rest) = read_u32(rest)?;
        let (len, rest) = read_u32(rest)?;
        Some((pri, delay, ttr, len, rest))
    });
    let Some((pri, delay, ttr, len, rest)) = header else {
        return Line::Error(reply::BAD_FORMAT);
    };
    if len > max_job_size {
        return Line::TooBig { len };
    }
    let opts = match parse_put_options(rest) {
        Some(opts) => opts,
        None => return Line::CountedError(Counted::Put, reply::BAD_FORMAT),
    };
    Line::Put { pri, delay, ttr, len, opts }
}

/// The extension tail of `put`: nothing (plain beanstalk) or ` ttl=<seconds>`.
/// beanstalkd answers `BAD_FORMAT` to any tail, so an old server rejects it cleanly.
fn parse_put_options(rest: &[u8]) -> Option<PutOptions> {
    if rest.is_empty() {
        return Some(PutOptions::default());
    }
    let ttl = whole_u32(rest.strip_prefix(b" ttl=")?)?;
    Some(PutOptions { ttl: Some(ttl) })
}

/// `pause-tube` reads the name loosely, as beanstalkd's `read_tube_name` does:
/// spaces are skipped and the longest run of name characters is the name (so
/// `pause-tubefoo 1` pauses `foo`); then the name must be a valid tube name.
fn parse_pause_tube(rest: &[u8]) -> Option<Command> {
    let skip = rest.iter().position(|&b| b != b' ').unwrap_or(rest.len());
    let rest = &rest[skip..];
    let name_len = rest.iter().take_while(|&&b| is_name_char(b)).count();
    let delay = whole_u32(&rest[name_len..])?;
    let name = TubeName::parse(&rest[..name_len])?;
    Some(Command::PauseTube { name, delay })
}

/// C's `strtoul`: leading white space, an optional sign, digits. Junk after
/// the digits is ignored; a minus sign negates modulo 2^64. `None` when no
/// digit was read or the value overflows 64 bits.
fn strtoul(input: &[u8]) -> Option<u64> {
    let (negative, digits) = sign_and_digits(input)?;
    let mut value: u64 = 0;
    for &d in digits {
        value = value.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
    }
    Some(if negative { value.wrapping_neg() } else { value })
}

/// C's `strtol` as beanstalkd checks it: no digits reads as 0; overflow of
/// the signed 64-bit range is `None`; junk after the digits is ignored.
fn strtol(input: &[u8]) -> Option<i64> {
    let Some((negative, digits)) = sign_and_digits(input) else { return Some(0) };
    let mut value: i64 = 0;
    for &d in digits {
        let d = i64::from(d - b'0');
        value = value.checked_mul(10)?;
        value = if negative { value.checked_sub(d)? } else { value.checked_add(d)? };
    }
    Some(value)
}

/// Splits C-style number syntax into its sign and its digits; `None` when
/// there are no digits.
fn sign_and_digits(input: &[u8]) -> Option<(bool, &[u8])> {
    let start = input.iter().position(|b| !b" \t\n\x0b\x0c\r".contains(b)).unwrap_or(input.len());
    let mut rest = &input[start..];
    let negative = rest.first() == Some(&b'-');
    if matches!(rest.first(), Some(b'-' | b'+')) {
        rest = &rest[1..];
    }
    let len = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    (len > 0).then_some((negative, &rest[..len]))
}

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
        line.push(prefix).push_decimal(n).push(reply::CRLF);
        line
    }

    /// `<prefix><id> <len>\r\n`, e.g. `RESERVED 5 12\r\n`.
    pub fn job_header(prefix: &[u8], id: u64, len: usize) -> ReplyLine {
        let mut line = ReplyLine::new();
        line.push(prefix).push_decimal(id).push(b" ").push_decimal(len as u64).push(reply::CRLF);
        line
    }

    /// `<prefix><text>\r\n`, e.g. `USING default\r\n`.
    pub fn text(prefix: &[u8], text: &str) -> ReplyLine {
        let mut line = ReplyLine::new();
        line.push(prefix).push(text.as_bytes()).push(reply::CRLF);
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode_all(input: &[u8], chunks: &[usize]) -> Vec<Decoded> {
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

    fn one(line: &str) -> Decoded {
        let mut v = decode_all(line.as_bytes(), &[line.len()]);
        v.retain(|d| *d != Decoded::PutHeader);
        assert_eq!(v.len(), 1, "{line:?} gave {v:?}");
        v.remove(0)
    }

    fn cmd(line: &str) -> Command {
        match one(line) {
            Decoded::Command(c) => c,
            other => panic!("{line:?} gave {other:?}"),
        }
    }

    fn err(line: &str) -> &'static [u8] {
        match one(line) {
            Decoded::Error(e) | Decoded::CountedError(_, e) => e,
            other => panic!("{line:?} gave {other:?}"),
        }
    }

    #[test]
    fn parses_every_command() {
        let t = |s: &str| TubeName::parse(s.as_bytes()).unwrap();
        assert_eq!(cmd("use foo\r\n"), Command::Use(t("foo")));
        assert_eq!(cmd("reserve\r\n"), Command::Reserve);
        assert_eq!(cmd("reserve-with-timeout 5\r\n"), Command::ReserveWithTimeout(Some(5)));
        assert_eq!(cmd("reserve-job 7\r\n"), Command::ReserveJob(7));
        assert_eq!(cmd("delete 9\r\n"), Command::Delete(9));
        assert_eq!(cmd("release 1 2 3\r\n"), Command::Release { id: 1, pri: 2, delay: 3 });
        assert_eq!(cmd("bury 1 2\r\n"), Command::Bury { id: 1, pri: 2 });
        assert_eq!(cmd("touch 4\r\n"), Command::Touch(4));
        assert_eq!(cmd("watch a\r\n"), Command::Watch(t("a")));
        assert_eq!(cmd("ignore a\r\n"), Command::Ignore(t("a")));
        assert_eq!(cmd("peek 3\r\n"), Command::Peek(3));
        assert_eq!(cmd("peek-ready\r\n"), Command::PeekReady);
        assert_eq!(cmd("peek-delayed\r\n"), Command::PeekDelayed);
        assert_eq!(cmd("peek-buried\r\n"), Command::PeekBuried);
        assert_eq!(cmd("kick 10\r\n"), Command::Kick(10));
        assert_eq!(cmd("kick-job 10\r\n"), Command::KickJob(10));
        assert_eq!(cmd("stats-job 1\r\n"), Command::StatsJob(1));
        assert_eq!(cmd("stats-tube x\r\n"), Command::StatsTube(t("x")));
        assert_eq!(cmd("stats\r\n"), Command::Stats);
        assert_eq!(cmd("list-tubes\r\n"), Command::ListTubes);
        assert_eq!(cmd("list-tube-used\r\n"), Command::ListTubeUsed);
        assert_eq!(cmd("list-tubes-watched\r\n"), Command::ListTubesWatched);
        assert_eq!(cmd("pause-tube x 5\r\n"), Command::PauseTube { name: t("x"), delay: 5 });
        assert_eq!(cmd("quit\r\n"), Command::Quit);
        assert_eq!(cmd("revoke 5\r\n"), Command::Revoke(5));
        assert_eq!(cmd("job-state 5\r\n"), Command::JobState(5));
        assert_eq!(cmd("polaris-stats\r\n"), Command::PolarisStats);
        assert_eq!(cmd("tube-ttl x 60\r\n"), Command::TubeTtl { name: t("x"), ttl: 60 });
    }

    #[test]
    fn put_with_body() {
        let got = cmd("put 1 2 3 5\r\nhe\r\no\r\n");
        let Command::Put { pri, delay, ttr, body, opts } = got else { panic!() };
        assert_eq!((pri, delay, ttr, &body[..], opts.ttl), (1, 2, 3, &b"he\r\no"[..], None));
        let Command::Put { opts, .. } = cmd("put 1 2 3 0 ttl=30\r\n\r\n") else { panic!() };
        assert_eq!(opts.ttl, Some(30));
    }

    #[test]
    fn numbers_follow_beanstalkd() {
        assert_eq!(cmd("delete   5\r\n"), Command::Delete(5));
        assert_eq!(err("delete -5\r\n"), reply::BAD_FORMAT);
        assert_eq!(err("delete 5 \r\n"), reply::BAD_FORMAT);
        assert_eq!(err("delete 5x\r\n"), reply::BAD_FORMAT);
        assert_eq!(cmd("peek 18446744073709551615\r\n"), Command::Peek(u64::MAX));
        assert_eq!(err("peek 18446744073709551616\r\n"), reply::BAD_FORMAT);
        assert_eq!(cmd("kick 4294967295\r\n"), Command::Kick(u32::MAX));
        // kick and reserve-with-timeout use C's strtoul/strtol, quirks and all.
        assert_eq!(cmd("kick 4294967296\r\n"), Command::Kick(0));
        assert_eq!(cmd("kick -1\r\n"), Command::Kick(u32::MAX));
        assert_eq!(cmd("kick +2junk\r\n"), Command::Kick(2));
        assert_eq!(err("kick x\r\n"), reply::BAD_FORMAT);
        assert_eq!(err("kick 99999999999999999999\r\n"), reply::BAD_FORMAT);
        assert_eq!(cmd("reserve-with-timeout abc\r\n"), Command::ReserveWithTimeout(Some(0)));
        assert_eq!(cmd("reserve-with-timeout -1\r\n"), Command::ReserveWithTimeout(None));
        assert_eq!(cmd("reserve-with-timeout 4294967297\r\n"), Command::ReserveWithTimeout(Some(1)));
        assert_eq!(err("reserve-with-timeout 99999999999999999999\r\n"), reply::BAD_FORMAT);
        assert_eq!(err("delete\r\n"), reply::UNKNOWN_COMMAND);
        assert_eq!(err("delete \r\n"), reply::BAD_FORMAT);
    }

    #[test]
    fn prefix_matching_quirks() {
        assert_eq!(err("reservex\r\n"), reply::BAD_FORMAT);
        assert_eq!(err("stats-tubex\r\n"), reply::BAD_FORMAT);
        assert_eq!(cmd("quitx\r\n"), Command::Quit);
        assert_eq!(err("PUT 1 2 3 4\r\n"), reply::UNKNOWN_COMMAND);
        assert_eq!(err("\r\n"), reply::UNKNOWN_COMMAND);
        assert_eq!(err("use\r\n"), reply::UNKNOWN_COMMAND);
        assert_eq!(err("use \r\n"), reply::BAD_FORMAT);
        assert_eq!(err("use -x\r\n"), reply::BAD_FORMAT);
        assert_eq!(err("use a\0b\r\n"), reply::BAD_FORMAT);
        let foo = TubeName::parse(b"foo").unwrap();
        assert_eq!(cmd("pause-tubefoo 1\r\n"), Command::PauseTube { name: foo, delay: 1 });
        assert_eq!(one("pause-tube -x 1\r\n"), Decoded::CountedError(Counted::PauseTube, reply::BAD_FORMAT));
    }

    #[test]
    fn tube_name_rules() {
        assert!(TubeName::parse(&[b'a'; 200]).is_some());
        assert!(TubeName::parse(&[b'a'; 201]).is_none());
        assert!(TubeName::parse(b"A-Za-z0-9+/;.$_()").is_some());
        assert!(TubeName::parse(b"a b").is_none());
        assert!(TubeName::parse(b"").is_none());
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
