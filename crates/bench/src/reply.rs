//! Reading replies out of a byte buffer, for the load loop and the blocking helpers.
//!
//! Framing and the reply words come from `polaris_proto` (its line scanner and its
//! [`reply`](polaris_proto::reply) constants); the `stats` YAML is read by its client's
//! [`Stats`]. What stays here is deliberately specialised for the load loop, which parses
//! hundreds of thousands of replies a second in place: `polaris_proto::client` reads one
//! reply at a time from its own socket into `String`s, and parses numbers with
//! `str::parse`, which would cost an allocation per reply and cannot work on a buffer
//! that holds a whole `read` of many pipelined replies.

use polaris_proto::client::Stats;

/// Where the reply line at the start of `buf` ends (the index of its `\r\n`), or `None`
/// if the line is not complete yet.
///
/// This is proto's [`scan_line_end`](polaris_proto::scan_line_end): a line ends at its
/// first `\r` if `\n` follows. A reply line never holds a bare `\r` (tube names and
/// numbers cannot), so that is the line's own terminator.
pub(crate) fn find_crlf(buf: &[u8]) -> Option<usize> {
    polaris_proto::scan_line_end(buf).map(|with_crlf| with_crlf - 2)
}

/// A decimal number made of digits only (no sign, no spaces), as servers write ids,
/// sizes and counts; `None` on anything else or on overflow. Allocation-free, for the
/// load loop.
pub(crate) fn parse_u64(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for &b in s {
        if !b.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(v)
}

/// Reads `key: value` from a `stats` reply (its YAML body, or the whole frame).
pub(crate) fn stats_field(yaml: &[u8], key: &str) -> Option<u64> {
    Stats::parse(&String::from_utf8_lossy(yaml)).get_u64(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crlf_and_numbers() {
        assert_eq!(find_crlf(b"INSERTED 5\r\n"), Some(10));
        assert_eq!(find_crlf(b"a\nb\r\n"), Some(3));
        assert_eq!(find_crlf(b"abc\r"), None);
        assert_eq!(parse_u64(b"00000000000000001234"), Some(1234));
        assert_eq!(parse_u64(b"99999999999999999999"), None);
        assert_eq!(parse_u64(b"1234"), Some(1234));
        assert_eq!(
            stats_field(b"---\ncurrent-jobs-urgent: 1\ncurrent-jobs-ready: 42\n", "current-jobs-ready"),
            Some(42)
        );
    }
}
