//! Commands: the [`Command`] enum, [`PutOptions`] and [`Counted`], and how one
//! command line is parsed, beanstalkd 1.12's quirks included.

use crate::reply;
use crate::tube_name::{is_name_char, TubeName};

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

impl Command {
    /// The job id the command names, for the commands that name one.
    pub fn job_id(&self) -> Option<u64> {
        use Command as C;
        match self {
            C::ReserveJob(id)
            | C::Delete(id)
            | C::Release { id, .. }
            | C::Bury { id, .. }
            | C::Touch(id)
            | C::Peek(id)
            | C::KickJob(id)
            | C::StatsJob(id)
            | C::Revoke(id)
            | C::JobState(id) => Some(*id),
            _ => None,
        }
    }
}

/// Commands that beanstalkd counts in `stats` even when it refuses them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counted {
    /// A `put` whose four numbers parsed (then too big, or trailing garbage).
    Put,
    /// Any line starting with `pause-tube`.
    PauseTube,
}

/// What a complete command line turned out to be.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Line {
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
pub(crate) fn parse_line(line: &[u8], max_job_size: u32) -> Line {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decoder::tests::{cmd, err, one};
    use crate::Decoded;

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
}
